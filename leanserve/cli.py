"""The `leanserve` command line (DESIGN.md section 6).

Each command parses its arguments, then hands off to a ``commands`` module of the subpackage that
does the work; heavy imports (torch, tritonclient, kopf) happen only inside the command that needs
them, so `leanserve validate` and `leanserve --help` stay fast. Any LeanserveError becomes one line
on stderr and exit code 1: nothing a user types prints a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from leanserve.errors import LeanserveError

app = typer.Typer(
    name="leanserve",
    help="Compress a model, gate it on quality, serve it on Triton on the cheapest pool that "
         "meets the SLO, and autoscale it. `leanserve run examples/minilm-cpu.yaml` does it all "
         "on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: typer's rich panels show "<bool>" beside --help and lower-case or
    # braced argument names ("{spec}") depending on the typer/click pair installed
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_SPEC = "examples/minilm-cpu.yaml"
MAX_STARTUP_SECONDS = 86_400.0  # a replica that takes more than a day to start is not modelled
DEFAULT_STARTUP_SECONDS = 120.0  # = leanserve.autoscaling.simulate.DEFAULT_STARTUP_SECONDS (kept
# here so `--help` does not import the simulator); a unit test holds them equal


def friendly(fn: F) -> F:
    """Turn the errors a user can cause into one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from leanserve.api.load import SpecError

        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            for line in exc.errors:
                err_console.print(f"[red]error:[/red] {escape(line)}", highlight=False,
                                  soft_wrap=True)
            raise typer.Exit(1) from None
        except LeanserveError as exc:
            err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@friendly
def validate(
    specs: Annotated[list[Path], typer.Argument(help="CompressedModel YAML files.",
                                                metavar="SPEC")],
    check_paths: Annotated[bool, typer.Option(
        help="Warn about local model and data paths (file://, relative, package://) that do "
             "not exist; relative paths are resolved against the spec file's folder.")] = True,
) -> None:
    """Check CompressedModel specs; print a one-line plan per document or every error."""
    from leanserve.api.load import SpecError, load_file
    from leanserve.api.paths import missing_paths

    failed = False
    for path in specs:
        try:
            loaded = load_file(path)
        except SpecError as exc:
            failed = True
            for line in exc.errors:
                where = "" if line.startswith(str(path)) else f"{path}: "
                err_console.print(f"[red]invalid[/red] {escape(where + line)}", highlight=False,
                                  soft_wrap=True)
            continue
        for item in loaded:
            for line in missing_paths(item) if check_paths else []:
                err_console.print(f"[yellow]warning[/yellow] {escape(f'{path}: {line}')}",
                                  highlight=False, soft_wrap=True)
            s = item.spec
            console.print(
                f"[green]valid[/green] {escape(str(path))}: {item.name}: "
                f"candidates={','.join(c.name for c in s.compression.candidates)} "
                f"pools={','.join(f'{p.name}(${p.hourly_price:g}/h)' for p in s.node_pools)} "
                f"slo=p95<={s.slo.latency_p95_ms:g}ms gate: quality drop <= "
                f"{s.quality.max_drop:g} ({s.quality.metric.value})",
                highlight=False, soft_wrap=True,
            )
    if failed:
        raise typer.Exit(1)


@app.command()
@friendly
def crd() -> None:
    """Print the CompressedModel CustomResourceDefinition (generated from leanserve.api)."""
    from leanserve.api.crd import crd_yaml

    sys.stdout.write(crd_yaml())


@app.command()
@friendly
def run(
    spec: Annotated[Path, typer.Argument(help="CompressedModel YAML.", metavar="SPEC")] = Path(
        DEFAULT_SPEC),
    workdir: Annotated[Path, typer.Option(
        help="Where reports, artifacts and logs go (relative to the current directory).",
        metavar="DIR")] = Path("leanserve-run"),
    load_seconds: Annotated[float, typer.Option(min=5, metavar="SECONDS",
                                                help="Length of the load burst.")] = 60.0,
) -> None:
    """The whole pipeline on one machine: compress, gate, serve, profile, load, autoscale."""
    from leanserve.local.commands import run_command

    run_command(spec, workdir=workdir, load_seconds=load_seconds, console=console)


@app.command()
@friendly
def compress(
    spec: Annotated[Path, typer.Argument(help="CompressedModel YAML.", metavar="SPEC")],
    out: Annotated[Path, typer.Option(help="Output directory (report.json, artifacts/, "
                                           "model_repository/).")],
) -> None:
    """Compress every candidate, apply the quality gate, export ONNX and a Triton repository."""
    from leanserve.compression.commands import compress_command

    compress_command(spec, out=out, console=console)


@app.command()
@friendly
def serve(
    repo: Annotated[Path, typer.Argument(help="Triton model repository.", metavar="REPO")],
    http_port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    grpc_port: Annotated[int, typer.Option(min=1, max=65535)] = 8001,
    metrics_port: Annotated[int, typer.Option(min=1, max=65535)] = 8002,
) -> None:
    """Start a real local tritonserver on REPO until Ctrl-C."""
    from leanserve.serving.commands import serve_command

    serve_command(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                  console=console)


@app.command()
@friendly
def bench(
    url: Annotated[str, typer.Option(help="HOST:PORT of Triton (HTTP 8000 or gRPC 8001).")],
    model: Annotated[str, typer.Option(help="Model name in the repository.")],
    rate: Annotated[float | None, typer.Option(min=0.1, help="Open-loop requests/s.")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Closed-loop clients.")] = None,
    duration: Annotated[float, typer.Option(min=0.5, help="Seconds of load.")] = 10.0,
    protocol: Annotated[str, typer.Option(help="http or grpc.")] = "http",
    arrivals: Annotated[str, typer.Option(help="poisson or constant.")] = "poisson",
    batch: Annotated[int, typer.Option(min=1, help="Rows per request.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Write the JSON result here.")] = None,
) -> None:
    """Drive load at Triton and report throughput, p50/p95/p99 latency and errors."""
    from leanserve.serving.commands import bench_command

    bench_command(url=url, model=model, rate=rate, concurrency=concurrency, duration=duration,
                  protocol=protocol, arrivals=arrivals, batch=batch, out=out, console=console)


@app.command()
@friendly
def profile(
    repo: Annotated[Path, typer.Argument(help="Triton model repository.", metavar="REPO")],
    spec: Annotated[Path, typer.Option(help="CompressedModel YAML (SLO and pools).")],
    out: Annotated[Path | None, typer.Option(help="Profile JSON (default REPO/profile.json).")]
    = None,
    quick: Annotated[bool, typer.Option(help="Search a smaller grid.")] = False,
    apply: Annotated[bool, typer.Option(
        help="Rewrite REPO's config.pbtxt with the best config (and the spec's queue timeout), "
             "so that what is served is what was measured.")] = False,
) -> None:
    """Measure per-replica capacity at the SLO, search the best config, price every pool."""
    from leanserve.serving.commands import profile_command

    profile_command(repo, spec=spec, out=out, quick=quick, apply=apply, console=console)


@app.command()
@friendly
def simulate(
    trace: Annotated[Path, typer.Option(help="CSV with header time_s,requests_per_s.")],
    spec: Annotated[Path, typer.Option(help="CompressedModel YAML.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    profile: Annotated[Path | None, typer.Option(help="Serving profile JSON.")] = None,
    startup_seconds: Annotated[float, typer.Option(
        help="Seconds from asking for a replica until it serves (pod scheduling, image pull, "
             "model load).", min=0, max=MAX_STARTUP_SECONDS)] = DEFAULT_STARTUP_SECONDS,
    peak_rps: Annotated[float | None, typer.Option(
        help="Rescale the trace so that its peak is this many requests/s (for a trace that "
             "gives the load's shape, such as bench/traces/*.csv).")] = None,
) -> None:
    """Replay a load trace against leanserve's policy (the shipped settings, printed), static,
    HPA at 70% and 85%, KEDA and an oracle; every request judged against the SLO. Prints the
    proven lower bound on what any policy pays for the share leanserve reached, and what an
    HPA that serves as many requests within the SLO pays."""
    from leanserve.autoscaling.commands import simulate_command

    simulate_command(trace=trace, spec=spec, profile=profile, out=out, console=console,
                     startup_seconds=startup_seconds, peak_rps=peak_rps)


@app.command()
@friendly
def operator(
    namespace: Annotated[str | None, typer.Option(help="Watch one namespace (default: all).")]
    = None,
) -> None:
    """Run the kopf operator against the current kubeconfig."""
    from leanserve.operator.commands import operator_command

    operator_command(namespace=namespace)


def main() -> None:
    from leanserve.quiet import quiet_libraries

    quiet_libraries()
    app()


if __name__ == "__main__":
    main()
