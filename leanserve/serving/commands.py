"""`leanserve serve`, `leanserve bench` and `leanserve profile`: thin wrappers with rich output.

Argument checking and presentation live here; the work is in server, loadgen and profile.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from leanserve.serving.errors import LoadError, ServingError


def serve_command(repo: Path, *, http_port: int, grpc_port: int, metrics_port: int,
                  console: Console) -> None:
    """Serve ``repo`` on a local tritonserver until Ctrl-C or until the server dies."""
    from leanserve.serving.repository import list_models
    from leanserve.serving.server import LocalTriton

    server = LocalTriton(repo, http_port=http_port, grpc_port=grpc_port,
                         metrics_port=metrics_port, strict_ports=True)
    # `kill`, `docker stop` and Kubernetes send SIGTERM: stop the server as Ctrl-C would.
    signal.signal(signal.SIGTERM, _interrupt)
    with console.status(f"starting tritonserver on {repo} ..."):
        server.start()
    try:
        table = Table(title=f"tritonserver (pid {server.pid}) serving {repo}")
        table.add_column("model")
        table.add_column("backend (cluster form)")
        table.add_column("max batch")
        for entry in list_models(repo):
            table.add_row(entry.name, entry.backend, str(entry.config.get("max_batch_size", 0)))
        console.print(table)
        console.print(f"HTTP    http://{server.http_url}\ngRPC    {server.grpc_url}\n"
                      f"metrics {server.metrics_url}\nCtrl-C stops the server.",
                      highlight=False)
        code = server.wait()
        raise ServingError(f"tritonserver exited with code {code}:\n{server.log_tail()}")
    finally:
        server.stop()


def bench_command(*, url: str, model: str, rate: float | None, concurrency: int | None,
                  duration: float, protocol: str, arrivals: str, batch: int, out: Path | None,
                  console: Console) -> None:
    """Drive load at a running Triton; print a table and optionally write the JSON result."""
    from leanserve.serving.inputs import make_inputs
    from leanserve.serving.loadgen import (
        Arrivals,
        LoadSpec,
        Protocol,
        fetch_model_config,
        run_load,
    )

    proto = _enum(Protocol, protocol, "protocol")
    arrival = _enum(Arrivals, arrivals, "arrivals")
    if rate is None and concurrency is None:
        raise LoadError("give --rate R (open loop, requests/s) or --concurrency C "
                        "(closed loop)")
    spec = LoadSpec(model=model, protocol=proto, rate=rate, concurrency=concurrency,
                    duration_s=duration, arrivals=arrival)
    spec.validate()
    config = fetch_model_config(url, model, proto)
    payloads = make_inputs(config, batch=batch)
    with Progress(TextColumn("[bold]bench[/bold] {task.description}"), BarColumn(),
                  TextColumn("{task.fields[done]} done / {task.fields[sent]} sent"),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task(f"{model} @ {url}", total=duration, done=0, sent=0)

        def on_progress(done: int, sent: int, elapsed: float) -> None:
            progress.update(task, completed=min(elapsed, duration), done=done, sent=sent)

        result = run_load([url], payloads, spec, on_progress=on_progress)
    console.print(_result_table(result))
    if result["error_samples"]:
        console.print(f"[yellow]errors, e.g.:[/yellow] {result['error_samples'][0]}",
                      highlight=False, soft_wrap=True)
    _write_json(result, out, console)


def profile_command(repo: Path, *, spec: Path, out: Path | None, quick: bool,
                    console: Console, apply: bool = False) -> None:
    """Profile ``repo`` under ``spec``'s SLO and pools; write REPO/profile.json by default."""
    from leanserve.api.load import load_one
    from leanserve.serving.profile import PROFILE_FILE, apply_profile_config, profile_repository

    loaded = load_one(spec)
    with console.status("profiling ...") as status:
        profile = profile_repository(repo, loaded.spec, quick=quick,
                                     note=lambda m: status.update(f"profiling: {m}"))
    grid = Table(title=f"capacity at p95 <= {profile['slo_latency_p95_ms']:g} ms "
                       f"({profile['measured_on']['cores']} cores)")
    for column in ("config", "capacity req/s", "p95 at capacity (ms)", "trials"):
        grid.add_column(column)
    for row in profile["grid"]:
        mark = " (best)" if row["config"] == profile["config"] else ""
        grid.add_row(row["label"] + mark, f"{row['capacity_rps']:.1f}",
                     _fmt(row["p95_ms_at_capacity"]), str(len(row["trials"])))
    console.print(grid)
    pools = Table(title="per pool")
    for column in ("pool", "capacity req/s", "USD per 1M requests", "measured", "basis"):
        pools.add_column(column)
    for name, pool in profile["pools"].items():
        pools.add_row(name, f"{pool['capacity_rps']:.1f}",
                      _fmt(pool["cost_per_million_requests"], ".4f"),
                      "yes" if pool["measured"] else "no", pool["basis"])
    console.print(pools)
    if profile["speedup_vs_default"] is not None:
        console.print(f"best config serves {profile['speedup_vs_default']:.2f}x the default "
                      "config's capacity", highlight=False)
    _write_json(profile, out or Path(repo) / PROFILE_FILE, console)
    if apply:
        written = apply_profile_config(
            repo, profile, queue_timeout_us=loaded.spec.serving.queue_timeout_microseconds)
        console.print(f"serving config written: {written}", highlight=False)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _enum(enum_type: Any, value: str, option: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(e.value for e in enum_type)
        raise LoadError(f"--{option} {value!r} not supported (allowed: {allowed})") from None


def _result_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"{result['model']} over {result['protocol']} ({result['mode']})")
    for column in ("requests", "errors", "throughput req/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(column)
    lat = result["latency_ms"]
    table.add_row(str(result["requests"]), str(result["errors"]),
                  f"{result['throughput_rps']:.1f}", _fmt(lat["p50"]), _fmt(lat["p95"]),
                  _fmt(lat["p99"]))
    return table


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _write_json(data: dict[str, Any], out: Path | None, console: Console) -> None:
    if out is None:
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ServingError(f"{out}: cannot write the result ({exc})") from None
    console.print(f"wrote {out}", highlight=False)
