"""compress(): spec -> baseline + candidates -> gate -> report, artifacts, model repository.

The one entry point the CLI (`leanserve compress`), the operator's Job and `leanserve run` share.

Baseline: the uncompressed model exported to ONNX *with the same graph optimizations* the
candidates get (ORT's transformer fusions where the model is BERT-like). Every speedup in the
report is therefore what compression bought on top of graph optimization; what graph
optimization and ONNX Runtime themselves buy over PyTorch is measured in bench/compression.py.

Atomicity: everything is built in a staging directory inside DIR and moved into place at the end,
report.json last, so a crash leaves no half-written result that looks like one (a stale staging
directory is all that remains, named ``.staging-*``).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanserve import fsio
from leanserve.api.load import LoadedSpec
from leanserve.api.spec import Candidate, QualityMetric, QuantizeMethod, QuantizeStep, Task
from leanserve.compression import techniques
from leanserve.compression.benchmark import BenchSettings, benchmark_many, take_rows
from leanserve.compression.costs import (
    candidate_costs,
    cpu_clock,
    cpu_price,
    gpu_price,
    serving_peak_rss,
)
from leanserve.compression.evaluate import (
    Gate,
    labels_of,
    predict,
    row_cosines,
    score,
    summary,
)
from leanserve.compression.export import export_onnx, is_packed, optimize
from leanserve.compression.loading import (
    LoadedModel,
    LoadError,
    batches,
    load_data,
    load_model,
    long_rows,
    split3,
)
from leanserve.compression.precision import gpu_seconds_used, training_device
from leanserve.compression.quantize import FAKE, serve_packed
from leanserve.compression.registry import (
    Batch,
    CompressionError,
    Context,
    Model,
    Stage,
    StepError,
    lookup,
)

REPORT = "report.json"
ARTIFACTS = "artifacts"
BASELINE = "baseline"
REPOSITORY = "model_repository"
PARETO = "pareto.png"
MODEL_FILE = "model.onnx"
TOKENIZER = "tokenizer"
# The exported baseline must give the torch model's outputs: float reordering moves a cosine by
# ~1e-7, an export error by far more.
EXPORT_MIN_COSINE = 0.9999


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    """Seed for the eval split and every technique."""
    threads: int = 2
    """Torch and ONNX Runtime threads (the cpu request of a small replica)."""
    batch_size: int = 32
    """Rows per batch for calibration, training and evaluation."""
    pack_tokens: bool = True
    """Export BERT-like text encoders padding-free (``packed.PackedEncoder``: projections,
    LayerNorms and GELUs on real tokens only; checked against the module's outputs)."""
    transformer_fusions: bool = False
    """Run ORT's offline BERT fusions (onnxruntime.transformers.optimizer) on exported graphs.
    Off by default: measured on MiniLM (2 threads, batch 32, interleaved), dynamic int8 of
    the fused graph ran at 0.86-0.89x the speed of dynamic int8 of the plain graph, fp32 gained
    ~3%, and ORT applies its Gelu/LayerNorm/SkipLayerNorm fusions at session load anyway; the
    attention fusion also does not match the packed graph."""
    fuse_attention: bool = True
    """With ``transformer_fusions``: also fuse attention into one op."""
    bench: BenchSettings = field(default_factory=BenchSettings)


class EventKind(str, enum.Enum):
    BASELINE = "baseline"
    CANDIDATE_START = "candidate-start"
    CANDIDATE_DONE = "candidate-done"
    DONE = "done"


@dataclass(frozen=True)
class Event:
    kind: EventKind
    name: str = ""
    index: int = 0
    total: int = 0
    result: dict[str, Any] | None = None


Progress = Callable[[Event], None]


@dataclass
class _Reported:
    """A held-out split that is measured and reported for every candidate, never decided on."""

    metric: QualityMetric
    batches: list[Batch]
    reference: Any
    labels: Any

    def summary(self, onnx_path: Path, threads: int) -> dict[str, Any]:
        return summary(self.metric, predict(onnx_path, self.batches, threads), self.reference,
                       self.labels)


@dataclass
class _Run:
    """What every candidate shares."""

    loaded: LoadedSpec
    model: LoadedModel
    train: list[Batch]
    eval: list[Batch]
    """The validation split: the gate (and any setting a step chooses) reads only this."""
    reference: Any
    labels: Any
    gate: Gate
    baseline: dict[str, Any]
    stage_dir: Path
    settings: Settings
    reported: dict[str, _Reported] = field(default_factory=dict)
    """``test`` (and ``long_inputs`` for text): reported in the report, never decided on."""

    @property
    def task(self) -> Task:
        return self.model.task


def compress(loaded: LoadedSpec, out: Path, *, progress: Progress | None = None,
             settings: Settings | None = None) -> dict[str, Any]:
    """Run every candidate of ``loaded``; write DESIGN.md section 4's files under ``out``.

    Raises CompressionError (a LeanserveError) only when the baseline cannot be built; a failing
    candidate records its ``error`` and the others go on.
    """
    s = settings or Settings()
    emit = progress or (lambda _e: None)
    techniques.load_all()
    torch.set_num_threads(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        run = _prepare(loaded, stage, s)
        emit(Event(EventKind.BASELINE, BASELINE, result=run.baseline))
        cands = loaded.spec.compression.candidates
        results = []
        for i, cand in enumerate(cands):
            emit(Event(EventKind.CANDIDATE_START, cand.name, i, len(cands)))
            result = _candidate(run, i, cand)
            results.append(result)
            emit(Event(EventKind.CANDIDATE_DONE, cand.name, i, len(cands), result))
        _time_all(run, results)
        report = _report(run, results)
        try:
            _write_repository(run, report)
            _write_pareto(stage / PARETO, report)
            fsio.write_text(stage / REPORT, json.dumps(report, indent=2) + "\n")
            _publish(stage, out)
        except OSError as exc:
            raise fsio.WriteError(fsio.describe(out, exc)) from None
        emit(Event(EventKind.DONE, report["selected"] or "", result=report))
        return report
    except OSError as exc:
        if fsio.disk_full(exc):  # results are staged: nothing was published under out
            raise fsio.WriteError(fsio.describe(out, exc)) from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# baseline


def _prepare(loaded: LoadedSpec, stage: Path, s: Settings) -> _Run:
    spec = loaded.spec
    task = spec.model.task
    model = load_model(spec.model.uri, spec.model.format, task, loaded.base_dir)
    rows = load_data(spec.data.uri, task, loaded.base_dir)
    if task.is_text and model.tokenizer is None:
        raise LoadError("spec.model.uri: a text model needs its tokenizer files "
                        "(tokenizer_config.json) beside the model")
    train_rows, val_rows, test_rows = split3(rows, spec.data.eval_fraction, s.seed)
    kw = {"tokenizer": model.tokenizer, "max_length": spec.model.max_sequence_length,
          "batch_size": s.batch_size}
    train, held, test = (batches(r, **kw) for r in (train_rows, val_rows, test_rows))
    long = batches(long_rows(test_rows, tokenizer=model.tokenizer,
                             max_length=spec.model.max_sequence_length), **kw) \
        if task.is_text else []

    base_dir = stage / BASELINE
    base_dir.mkdir()
    base_path = base_dir / MODEL_FILE
    try:
        if model.module is not None:
            exported = export_onnx(model.module, held[0], stage / "work" / "baseline.onnx", task,
                                   pack=s.pack_tokens)
        else:
            assert model.onnx_path is not None
            exported = model.onnx_path
        opt = optimize(exported, base_path, bert=model.bert if s.transformer_fusions else None,
                       check=held[0], attention=s.fuse_attention, threads=s.threads)
        reference = predict(base_path, held, s.threads)
        export_cosine = _export_agreement(model.module, held, reference)
    except CompressionError as exc:
        raise CompressionError(f"baseline: {exc}") from None
    except Exception as exc:  # onnxruntime raises its own types for graphs it cannot run
        raise CompressionError(f"baseline: the model does not run in ONNX Runtime "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    labels = labels_of(held)
    metric = spec.quality.metric
    quality = score(metric, reference, reference, labels)
    reported = {"test": _Reported(metric, test, predict(base_path, test, s.threads),
                                  labels_of(test))}
    if long:  # joined sentences carry no label: judged against the baseline by cosine
        reported["long_inputs"] = _Reported(QualityMetric.COSINE, long,
                                            predict(base_path, long, s.threads), None)
    baseline = {"size_bytes": base_path.stat().st_size, "quality": quality,
                "latency_ms": None, "throughput_rps": None,  # timed with the candidates
                "artifact": f"{BASELINE}/{MODEL_FILE}",
                "export_min_cosine": export_cosine,
                "peak_rss_bytes": serving_peak_rss(base_path, take_rows(held, s.bench.batch),
                                                   s.threads),
                **{name: r.summary(base_path, s.threads) for name, r in reported.items()},
                "notes": {"graph": ("padding-free (packed tokens); " if is_packed(base_path)
                                    else "") + opt.note, "fused": opt.fused}}
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(base_dir / TOKENIZER))
    return _Run(loaded=loaded, model=model, train=train, eval=held, reference=reference,
                labels=labels, gate=Gate(metric, spec.quality.max_drop, quality),
                baseline=baseline, stage_dir=stage, settings=s, reported=reported)


def _export_agreement(module: Any, held: list[Batch], reference: np.ndarray) -> float | None:
    """The worst row cosine between the torch model and the baseline ONNX graph every candidate
    is judged against: an export error must fail the run, not hide in the reference. None when
    the model came as ONNX (nothing was exported)."""
    if module is None:
        return None
    with torch.no_grad():
        ours = np.concatenate([module.eval()(**b.inputs).float().numpy() for b in held])
    worst = float(row_cosines(ours, reference).min())
    if not worst >= EXPORT_MIN_COSINE:
        raise CompressionError(f"the exported ONNX graph differs from the torch model (worst row "
                               f"cosine {worst:.6f} < {EXPORT_MIN_COSINE}); report this model")
    return worst


# --------------------------------------------------------------------------------------------
# candidates


def _candidate(run: _Run, index: int, cand: Candidate) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": cand.name, "steps": [st.to_wire() for st in cand.steps],
        "size_bytes": None, "packed_size_bytes": None, "quality": None, "quality_drop": None,
        "latency_ms": None,
        "throughput_rps": None, "speedup": None, "passed": False, "artifact": None,
        "error": None, "notes": {},
    }
    workdir = run.stage_dir / "work" / cand.name
    workdir.mkdir(parents=True, exist_ok=True)
    on_gpu = training_device().type == "cuda"  # training steps hold the GPU while they run
    gpu_before = gpu_seconds_used()
    with cpu_clock() as spent:
        try:
            model = _apply_steps(run, index, cand, workdir)
            art_dir = run.stage_dir / ARTIFACTS / cand.name
            art_dir.mkdir(parents=True)
            art = art_dir / MODEL_FILE
            assert model.onnx_path is not None
            shutil.copyfile(model.onnx_path, art)
            if run.model.tokenizer is not None:
                run.model.tokenizer.save_pretrained(str(art_dir / TOKENIZER))
            result["artifact"] = f"{ARTIFACTS}/{cand.name}/{MODEL_FILE}"
            result["notes"] = _jsonable(model.notes)
            # size_bytes is the file that is served (power-of-two and binary weights packed,
            # decoded at load); packed_size_bytes is what the scheme's packing alone would hold,
            # reported apart and never selected on.
            result["size_bytes"] = art.stat().st_size
            result["packed_size_bytes"] = model.packed_bytes
            outputs = predict(art, run.eval, run.settings.threads)
            quality = score(run.gate.metric, outputs, run.reference, run.labels)
            result.update(quality=quality, quality_drop=run.gate.drop(quality),
                          passed=run.gate.passed(quality),
                          validation=summary(run.gate.metric, outputs, run.reference, run.labels))
            for name, reported in run.reported.items():
                result[name] = reported.summary(art, run.settings.threads)
        except Exception as exc:  # recorded in the report: one candidate never stops the others
            if fsio.disk_full(exc):
                raise  # ... except a full disk, which stops everything after it too
            result["error"] = _describe(exc)
            result["passed"] = False
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    # priced once every model is timed (_time_all)
    result["cost"] = {"cpu_seconds": spent[0],
                      "gpu_seconds": gpu_seconds_used() - gpu_before if on_gpu else None}
    if result["artifact"] is not None and result["error"] is None:
        result["peak_rss_bytes"] = serving_peak_rss(run.stage_dir / result["artifact"],
                                                    take_rows(run.eval, run.settings.bench.batch),
                                                    run.settings.threads)
    return result


def _time_all(run: _Run, results: list[dict[str, Any]]) -> None:
    """Time the baseline and every candidate that built together, interleaved
    (``benchmark.benchmark_many``): the throughputs selection compares were measured under the
    same load. Then price each candidate's compression and serving (``costs``)."""
    s = run.settings
    paths = {BASELINE: run.stage_dir / run.baseline["artifact"]}
    for r in results:
        if r["artifact"] is not None and r["error"] is None:
            paths[r["name"]] = run.stage_dir / r["artifact"]
    timed = benchmark_many(paths, run.eval, s.bench)
    run.baseline.update(timed[BASELINE].as_report())
    run.baseline["timing"] = s.bench.timing()
    base_rps = run.baseline["throughput_rps"]
    for r in results:
        bench = timed.get(r["name"])
        if bench is not None:
            r.update(bench.as_report())
            r["speedup"] = bench.throughput_rps / base_rps if base_rps else None
        spent = r.get("cost") or {}
        r["cost"] = candidate_costs(spent.get("cpu_seconds", 0.0), cpu_price(run.loaded.spec),
                                    s.threads, base_rps, r["throughput_rps"],
                                    gpu_seconds=spent.get("gpu_seconds"),
                                    gpu=gpu_price(run.loaded.spec))


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, CompressionError):
        return msg or type(exc).__name__
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _apply_steps(run: _Run, index: int, cand: Candidate, workdir: Path) -> Model:
    torch.manual_seed(run.settings.seed)
    s = run.settings
    if run.model.module is not None:
        model = Model(module=copy.deepcopy(run.model.module).eval())
    else:
        model = Model(onnx_path=run.stage_dir / BASELINE / MODEL_FILE)
    for j, step in enumerate(cand.steps):
        path = f"spec.compression.candidates[{index}].steps[{j}]"
        cfg = step.config
        ctx = Context(task=run.task, train=run.train, teacher=run.model.module or _no_teacher(),
                      workdir=workdir / f"step{j}", seed=s.seed, threads=s.threads,
                      num_labels=run.model.num_labels, extra={"step_path": path},
                      to_onnx=lambda m, where: _to_onnx(run, m, where))
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        try:
            tech = lookup(cfg)
        except StepError as exc:
            raise StepError(f"{path}.{step.kind}: {exc}") from None
        if tech.stage is Stage.TORCH and model.module is None:
            why = ("the model's format is onnx" if run.model.module is None
                   else "an earlier step already produced the ONNX graph")
            raise StepError(f"{path}.{step.kind}: runs on the torch model, but {why} "
                            "(put torch steps first, or give a huggingface/torchscript model)")
        if tech.stage is Stage.ONNX and model.module is not None:
            model = _to_onnx(run, model, workdir / f"step{j}-export")
        model = tech.transform(model, cfg, ctx)
        if model.module is not None:
            model.module.eval()
    if model.module is not None:
        model = _to_onnx(run, model, workdir / "final-export")
        fake = [st.config.method for st in cand.steps
                if isinstance(st.config, QuantizeStep) and st.config.method in FAKE]
        if fake:  # the fp32 values on a power-of-two or binary grid: served packed
            model = _serve_packed(model, fake[-1], workdir / "final-export")
    return model


def _serve_packed(model: Model, method: QuantizeMethod, where: Path) -> Model:
    """The exported graph with its grid weights stored packed (quantize.serve_packed); the
    fp32 graph, saying why, when no weight is on the grid any more (a later training step
    moved them off it)."""
    assert model.onnx_path is not None
    out = where / "packed.onnx"
    try:
        notes = serve_packed(model.onnx_path, out, method)
    except StepError as exc:
        return Model(onnx_path=model.onnx_path, packed_bytes=model.packed_bytes,
                     notes={**model.notes, "size": f"served as fp32: {exc}"})
    return Model(onnx_path=out, packed_bytes=model.packed_bytes, notes={**model.notes, **notes})


def _no_teacher() -> torch.nn.Module:
    return torch.nn.Identity()


def _to_onnx(run: _Run, model: Model, where: Path) -> Model:
    assert model.module is not None
    where.mkdir(parents=True, exist_ok=True)
    s = run.settings
    exported = export_onnx(model.module, run.eval[0], where / "exported.onnx", run.task,
                           pack=s.pack_tokens)
    opt = optimize(exported, where / MODEL_FILE,
                   bert=run.model.bert if s.transformer_fusions else None, check=run.eval[0],
                   attention=s.fuse_attention, threads=s.threads)
    graph = ("padding-free (packed tokens); " if is_packed(opt.path) else "") + opt.note
    notes = {**model.notes, "graph": graph}
    return Model(onnx_path=opt.path, packed_bytes=model.packed_bytes, notes=notes)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------------------------
# report, repository, plot, publishing


THROUGHPUT_TIE = 0.10
"""Candidates within this share of the fastest one's throughput count as equally fast; among
them the smaller quality drop wins, then the smaller served file. Why 10%: on these shared
CPUs, with every model timed together in interleaved rounds, two structurally identical MiniLM
graphs (int8 and qat-int8: the same ops, different weights) timed 1% apart in one run and 13%
apart in another under heavier load, and the digits CNN's sub-millisecond candidates (qat-int8,
power-of-two) swapped places 6% apart between two runs; a 5% band picked different candidates
in two runs there, 10% picked the same. Quality and size are measured exactly."""


def select(candidates: list[dict[str, Any]]) -> str | None:
    """The fastest passed candidate; within THROUGHPUT_TIE of the fastest, the one that loses
    the least quality, then the smaller one."""
    ok = [c for c in candidates if c["passed"] and c["error"] is None]
    if not ok:
        return None
    top = max(c["throughput_rps"] for c in ok)
    tied = [c for c in ok if c["throughput_rps"] >= (1 - THROUGHPUT_TIE) * top]
    return min(tied, key=lambda c: (c.get("quality_drop") or 0.0, c["size_bytes"]))["name"]


def _report(run: _Run, results: list[dict[str, Any]]) -> dict[str, Any]:
    spec = run.loaded.spec
    selected = select(results)
    ordered = sorted(results, key=lambda c: c["name"] != selected)
    return {
        "model": run.loaded.name,
        "task": run.task.value,
        "metric": spec.quality.metric.value,
        "max_drop": spec.quality.max_drop,
        "baseline": run.baseline,
        "candidates": ordered,
        "selected": selected,
        "rows": {"train": sum(len(b.inputs[next(iter(b.inputs))]) for b in run.train),
                 "eval": int(run.reference.shape[0])},
        "threads": run.settings.threads,
    }


def _write_repository(run: _Run, report: dict[str, Any]) -> None:
    name = report["selected"]
    if name is None:
        return
    art_dir = run.stage_dir / ARTIFACTS / name
    try:
        from leanserve.serving.repository import write_model_repository
    except ImportError as exc:
        report["model_repository_error"] = f"serving.repository unavailable: {exc}"
        return
    spec = run.loaded.spec
    tok = art_dir / TOKENIZER
    try:
        write_model_repository(art_dir / MODEL_FILE, run.stage_dir / REPOSITORY, run.loaded.name,
                               task=run.task, max_batch_size=spec.serving.max_batch_size,
                               max_queue_delay_us=spec.serving.max_queue_delay_microseconds,
                               queue_timeout_us=spec.serving.queue_timeout_microseconds,
                               backend="onnxruntime",
                               tokenizer_dir=tok if tok.exists() else None)
    except Exception as exc:  # recorded: the report and artifacts are still worth keeping
        shutil.rmtree(run.stage_dir / REPOSITORY, ignore_errors=True)
        report["model_repository_error"] = _describe(exc)
        return
    report["model_repository"] = REPOSITORY


def _write_pareto(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = report["baseline"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    biggest = max([base["size_bytes"]] + [c["size_bytes"] or 0 for c in report["candidates"]])

    def area(size: float) -> float:
        return 40 + 600 * size / biggest

    ax.scatter([base["latency_ms"]["p50"]], [base["quality"]], s=area(base["size_bytes"]),
               marker="*", c="black", label="baseline (fp32 ONNX)")
    for c in report["candidates"]:
        if c["quality"] is None or c["latency_ms"] is None:
            continue
        color = "tab:green" if c["passed"] else "tab:red"
        ax.scatter([c["latency_ms"]["p50"]], [c["quality"]], s=area(c["size_bytes"]), c=color,
                   alpha=0.6, edgecolors="k")
        label = c["name"] + (" (selected)" if c["name"] == report["selected"] else "")
        ax.annotate(label, (c["latency_ms"]["p50"], c["quality"]), fontsize=8,
                    xytext=(5, 5), textcoords="offset points")
    ax.axhline(base["quality"] - report["max_drop"], ls="--", c="gray", lw=0.8,
               label=f"gate ({report['metric']} drop <= {report['max_drop']:g})")
    ax.set_xlabel("latency p50 at batch 1 (ms)")
    ax.set_ylabel(f"quality ({report['metric']})")
    ax.set_title(f"{report['model']}: quality vs latency (area = size)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _publish(stage: Path, out: Path) -> None:
    """Move the staged results over the old ones; report.json goes last."""
    with contextlib.suppress(FileNotFoundError):
        (out / REPORT).unlink()
    for name in (BASELINE, ARTIFACTS, REPOSITORY, PARETO):
        src, dst = stage / name, out / name
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        if src.exists():
            os.replace(src, dst)
    os.replace(stage / REPORT, out / REPORT)


__all__ = ["Event", "EventKind", "Settings", "compress", "select"]
