"""Compression benchmark: every candidate, each technique alone, and ONNX Runtime's plain int8
side by side in one run.

    python bench/compression.py [SPEC] [--out DIR] [--reuse DIR] [--rounds N] [--no-alone]
        [--candidates FILE]

``--candidates FILE`` (YAML: a list of candidates as in spec.compression.candidates) measures
those instead of the spec's, on the spec's model and data (bench/distill_cnn.py writes one).

``--reuse DIR`` takes the compress() results an earlier run left in DIR (report.json, and
alone/report.json when there) instead of compressing again: a second, independent timing of
the same artifacts.

One run of `compress()` on the spec (default examples/minilm-cpu.yaml), then, in the same
process with 2 threads and batch 32 of held-out rows (tokens up to maxSequenceLength):
- torch-fp32: the uncompressed torch module (the sentence-transformers computation);
- onnx-fp32: the pipeline's baseline (the fp32 graph every candidate is judged against);
- ort-dynamic-int8: onnxruntime.quantization.quantize_dynamic on the plain fp32 export (no
  fusions, default settings: what Hugging Face Optimum does);
- ort-static-int8: onnxruntime.quantization.quantize_static (QDQ, MinMax ranges calibrated on
  256 training rows, default settings) on the plain fp32 export;
- every candidate's artifact, the selected one marked;
- each technique alone: every step of a multi-step candidate run as a candidate of its own (a
  second compress() run, never selectable), so a combination's gain can be told apart.

Quality is measured on the validation split (what gates) and on the test split (what no choice
ever looked at), both against the baseline's outputs: mean, 5th percentile and worst row cosine,
or accuracy with its 95% interval. Size is the served file (% of the fp32 export); a packed size
that differs (power-of-two, binary) is its own column and never selected on. Payback is the
report's: requests after which the serving saving repays the recipe's CPU cost.

Timing: warm-up, then ``--rounds`` rounds that each run at least ``--calls`` calls (and at least
MIN_ROUND_S seconds of calls) of every model in a rotated order with a short pause before each
model (idle thread pools spin). ms/b32 is the median over all calls; the speed-up columns are
paired: in each round, one model's median call against the other's, timed seconds apart, then
the median of those per-round ratios (a disturbance of this shared machine that hits a few
rounds moves a ratio of overall medians, and this much less). The target line gives both, and the
per-round quartiles. The table's header says how many calls each model got. The selection is
re-derived from this second, independent timing with the pipeline's own rule and printed beside
compress()'s: two runs agreeing on the selected candidate is what "timings that select reliably"
means. Prints the issue's targets as met or MISSED.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanserve.api.load import LoadedSpec, load_one, parse
from leanserve.api.spec import QualityMetric
from leanserve.compression.benchmark import interleave, take_rows
from leanserve.compression.costs import serving_peak_rss
from leanserve.compression.evaluate import summary
from leanserve.compression.export import export_onnx, feeds, run_onnx, session
from leanserve.compression.loading import batches, load_data, load_model, split3
from leanserve.compression.pipeline import Settings, compress, select

THREADS = 2
BATCH = 32
PAUSE_S = 0.05
MIN_ROUND_S = 0.1
CALIBRATION_ROWS = 256


def single_steps(loaded: LoadedSpec) -> LoadedSpec | None:
    """The spec with one candidate per distinct step of its multi-step candidates that is not
    a candidate of its own already, named ``alone-<kind>-<n>`` (None when there is none)."""
    raw = copy.deepcopy(loaded.raw)
    cands = raw["spec"]["compression"]["candidates"]
    singles = [c["steps"][0] for c in cands if len(c["steps"]) == 1]  # measured already
    seen: list[dict] = []
    for cand in cands:
        if len(cand["steps"]) > 1:
            seen += [st for st in cand["steps"] if st not in seen and st not in singles]
    if not seen:
        return None
    raw["spec"]["compression"]["candidates"] = [
        {"name": f"alone-{next(iter(st))}-{i}".lower(), "steps": [st]}
        for i, st in enumerate(seen, start=1)]
    return LoadedSpec(parse(raw), loaded.base_dir, raw)


class _Reader:
    """Calibration rows for ORT's static quantizer (its CalibrationDataReader protocol)."""

    def __init__(self, train: list, names: set[str], rows: int) -> None:
        def gen():
            left = rows
            for b in train:
                if left <= 0:
                    return
                f = {k: v[:left] for k, v in feeds(b).items() if k in names}
                left -= next(iter(f.values())).shape[0]
                yield f
        self._it = gen()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        pass


def ort_int8(plain: Path, work: Path, train: list) -> dict[str, Path]:
    """ONNX Runtime's own int8 of the plain fp32 export, with its default settings."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    from leanserve.compression.quantize import _quiet

    dyn, static = work / "ort-dynamic-int8.onnx", work / "ort-static-int8.onnx"
    names = {i.name for i in onnx.load(str(plain), load_external_data=False).graph.input}
    CalibrationDataReader.register(_Reader)
    with _quiet():
        quantize_dynamic(str(plain), str(dyn))
        quantize_static(str(plain), str(static), _Reader(train, names, CALIBRATION_ROWS),
                        quant_format=QuantFormat.QDQ)
    return {"ort-dynamic-int8": dyn, "ort-static-int8": static}


def timed(calls: dict[str, Callable[[], object]], rounds: int, per_round: int
          ) -> tuple[dict[str, float], dict[str, int], dict[str, np.ndarray]]:
    """Median seconds per call of each model, how many calls it got, and its median in each
    round (the pipeline's ``benchmark.interleave``: rotated rounds, a pause before each
    model, at least MIN_ROUND_S of calls per round)."""
    times = interleave(calls, rounds, per_round, warmup=2, pause_s=PAUSE_S,
                       min_round_s=MIN_ROUND_S)
    return ({k: float(np.median(v)) for k, v in times.items()},
            {k: len(v) for k, v in times.items()},
            {k: by_round(v, rounds) for k, v in times.items()})


def by_round(times: list[float], rounds: int) -> np.ndarray:
    """Median of each round's calls (interleave gives a model the same number every round)."""
    if not times or len(times) % rounds:
        raise ValueError(f"{len(times)} timed calls do not split into {rounds} equal rounds")
    return np.median(np.asarray(times, dtype=float).reshape(rounds, -1), axis=1)


def speedup(rounds: dict[str, np.ndarray], model: str, over: str) -> tuple[float, float, float]:
    """How many times faster ``model`` runs than ``over``, paired by round: the median of the
    per-round ratios, and their 25th and 75th percentiles."""
    ratios = rounds[over] / rounds[model]
    return (float(np.median(ratios)), float(np.percentile(ratios, 25)),
            float(np.percentile(ratios, 75)))


def _quality(fig: dict[str, Any] | None) -> str:
    if not fig:
        return "-"
    if "accuracy" in fig:
        lo, hi = fig["ci95"]
        return f"{fig['accuracy']:.3f} [{lo:.3f},{hi:.3f}]"
    return f"{fig['mean']:.4f}/{fig['p5']:.4f}/{fig['worst']:.4f}"


def _mb(size: float) -> str:
    return f"{size / 1e6:.2f}" if size < 1e7 else f"{size / 1e6:.1f}"


def _val(fig: dict[str, Any] | None) -> str:
    if not fig:
        return "-"
    return f"{fig['accuracy']:.3f}" if "accuracy" in fig else f"{fig['mean']:.4f}"


def with_candidates(loaded: LoadedSpec, path: Path) -> LoadedSpec:
    """``loaded`` with its candidates replaced by the list in the YAML file ``path``."""
    import yaml

    raw = copy.deepcopy(loaded.raw)
    raw["spec"]["compression"]["candidates"] = yaml.safe_load(path.read_text())
    return LoadedSpec(parse(raw), loaded.base_dir, raw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?", default="examples/minilm-cpu.yaml")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a DIR of an earlier run: time its artifacts again, compress nothing")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--calls", type=int, default=2, help="calls per model per round")
    ap.add_argument("--no-alone", action="store_true",
                    help="skip the run of each technique alone")
    ap.add_argument("--candidates", type=Path, default=None,
                    help="a YAML list of candidates to measure instead of the spec's")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    loaded = load_one(args.spec)
    if args.candidates is not None:
        loaded = with_candidates(loaded, args.candidates)
    spec = loaded.spec
    out = args.reuse or args.out or Path(tempfile.mkdtemp(prefix="leanserve-bench-"))
    t0 = time.perf_counter()
    if args.reuse:
        report = json.loads((out / "report.json").read_text())
        print(f"reusing compress() results in {out}")
    else:
        report = compress(loaded, out, settings=Settings(threads=THREADS))
        print(f"compress(): {time.perf_counter() - t0:.0f} s, report in {out / 'report.json'}")
    alone = None if args.no_alone else single_steps(loaded)
    alone_report: dict = {"candidates": []}
    if alone is not None and args.reuse and (out / "alone" / "report.json").exists():
        alone_report = json.loads((out / "alone" / "report.json").read_text())
    elif alone is not None:
        t0 = time.perf_counter()
        alone_report = compress(alone, out / "alone", settings=Settings(threads=THREADS))
        print(f"compress() of each technique alone: {time.perf_counter() - t0:.0f} s")

    settings = Settings()
    model = load_model(spec.model.uri, spec.model.format, spec.model.task, loaded.base_dir)
    rows = load_data(spec.data.uri, spec.model.task, loaded.base_dir)
    train_rows, val_rows, test_rows = split3(rows, spec.data.eval_fraction, settings.seed)
    kw = {"tokenizer": model.tokenizer, "max_length": spec.model.max_sequence_length,
          "batch_size": BATCH}
    train, val, test = (batches(r, **kw) for r in (train_rows, val_rows, test_rows))
    bench_batch = take_rows(val, BATCH)
    metric = spec.quality.metric

    work = Path(tempfile.mkdtemp(prefix="leanserve-bench-work-"))
    plain = export_onnx(model.module, val[0], work / "plain.onnx", spec.model.task)
    fp32_size = plain.stat().st_size
    extra = {"onnx-fp32": out / report["baseline"]["artifact"],
             **ort_int8(plain, work, train)}
    base_sess = session(extra["onnx-fp32"], THREADS)

    def outputs(sess: Any, part: list) -> np.ndarray:
        return np.concatenate([run_onnx(sess, b) for b in part])

    refs = {"validation": outputs(base_sess, val), "test": outputs(base_sess, test)}
    labels = {"validation": val_rows.labels, "test": test_rows.labels}

    def figures(sess: Any) -> dict[str, Any]:
        return {split: summary(metric, outputs(sess, part), refs[split], labels[split])
                for split, part in (("validation", val), ("test", test))}

    rowsinfo: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[], object]] = {}

    def torch_call() -> None:
        with torch.inference_mode():
            model.module(**bench_batch.inputs)

    with torch.inference_mode():
        tout = {split: np.concatenate([model.module(**b.inputs).float().numpy() for b in part])
                for split, part in (("validation", val), ("test", test))}
    calls["torch-fp32"] = torch_call
    rowsinfo["torch-fp32"] = {
        "kind": "reference", "size": fp32_size, "packed": None, "payback": None, "rss": None,
        **{s: summary(metric, tout[s], refs[s], labels[s]) for s in tout}}
    for name, path in extra.items():
        sess = session(path, THREADS)
        calls[name] = lambda s=sess: run_onnx(s, bench_batch)
        rowsinfo[name] = {"kind": "baseline" if name == "onnx-fp32" else "ORT default",
                          "size": path.stat().st_size, "packed": None, "payback": None,
                          "path": path, **figures(sess)}
    for kind, rep, root in (("candidate", report, out), ("alone", alone_report, out / "alone")):
        for c in rep["candidates"]:
            if not c["artifact"] or c["error"]:
                continue
            sess = session(root / c["artifact"], THREADS)
            calls[c["name"]] = lambda s=sess: run_onnx(s, bench_batch)
            cost = c.get("cost") or {}
            rowsinfo[c["name"]] = {"kind": kind, "size": c["size_bytes"],
                                   "packed": c.get("packed_size_bytes"),
                                   "payback": cost.get("payback_requests"),
                                   "saves": (cost.get("serving") or {}).get("saving_per_million"),
                                   "path": root / c["artifact"], "steps": c["steps"],
                                   "validation": c.get("validation"), "test": c.get("test"),
                                   "passed": c["passed"]}

    med, counts, per_round = timed(calls, args.rounds, args.calls)

    def vs(name: str, over: str) -> float:
        return speedup(per_round, name, over)[0]

    for info in rowsinfo.values():  # one fresh serving process per model, after the timing
        if info.get("path") is not None:
            info["rss"] = serving_peak_rss(info["path"], bench_batch, THREADS)

    seq = bench_batch.inputs[next(iter(bench_batch.inputs))].shape
    mask = bench_batch.inputs.get("attention_mask")
    real = (f", {100 * float(mask.float().mean()):.0f}% real tokens" if mask is not None
            else "")
    print(f"\n{loaded.name}: batch {BATCH} (input shape {list(seq)}{real}), {THREADS} threads, "
          f"{args.rounds} interleaved rounds, {min(counts.values())}-{max(counts.values())} "
          f"timed calls per model (compress() timed its own: at least "
          f"{report['baseline'].get('timing', {}).get('calls_batch', '?')} per model); "
          f"quality = {metric.value} to the fp32 baseline on {len(val_rows)} validation and "
          f"{len(test_rows)} test rows\n")
    qhead = "val acc" if metric is QualityMetric.ACCURACY else "val mean"
    thead = "test acc [95% CI]" if metric is QualityMetric.ACCURACY else "test mean/p5/worst"
    head = (f"{'model':<24}{'ms/b32':>8}{'vs torch':>9}{'vs onnx32':>10}{'vs ort8':>8}"
            f"{qhead:>9}  {thead:<22}"
            f"{'MB':>6}{'% fp32':>7}{'packed':>7}{'RSS MB':>7}{'payback req':>13}  gate/steps")
    print(head)
    print("-" * len(head))
    for name, info in rowsinfo.items():
        steps = ", ".join(f"{k}:{v.get('method', '') or ''}".rstrip(":")
                          for st in info.get("steps", []) for k, v in st.items())
        mark = " *selected" if name == report["selected"] else ""
        gate = ("pass " if info.get("passed") else "FAIL ") if "passed" in info else ""
        packed = _mb(info["packed"]) if info["packed"] else "-"
        rss = f"{info['rss'] / 1e6:.0f}" if info.get("rss") else "-"
        pay = (f"{info['payback']:,}" if info["payback"] is not None
               else ("never" if info.get("saves") is not None else "-"))
        print(f"{name:<24}{med[name] * 1000:>8.1f}{vs(name, 'torch-fp32'):>8.2f}x"
              f"{vs(name, 'onnx-fp32'):>9.2f}x"
              f"{vs(name, 'ort-dynamic-int8'):>7.2f}x{_val(info.get('validation')):>9}  "
              f"{_quality(info.get('test')):<22}{_mb(info['size']):>6}"
              f"{100 * info['size'] / fp32_size:>6.1f}%{packed:>7}{rss:>7}{pay:>13}  "
              f"{gate}{info['kind']}{': ' + steps if steps else ''}{mark}")
    for rep in (report, alone_report):
        for c in rep["candidates"]:
            if c["error"]:
                print(f"{c['name']:<24}error: {c['error']}")

    sel = report["selected"]
    print()
    if sel is None:
        print("targets: MISSED (no candidate passed the quality gate)")
        return 0
    # the pipeline's selection rule applied to this run's independent timing
    again = select([{**c, "throughput_rps": BATCH / med[c["name"]]}
                    for c in report["candidates"] if c["name"] in med])
    print(f"selection: compress() picked {sel}; this run's timing picks {again} "
          f"({'agree' if again == sel else 'DISAGREE'})")
    s = rowsinfo[sel]
    t = s["test"]
    fast, lo, hi = speedup(per_round, sel, "ort-dynamic-int8")
    if metric is QualityMetric.COSINE:
        checks = [
            (f"test-split mean cosine >= 0.99 ({t['mean']:.4f}; p5 {t['p5']:.4f}, worst "
             f"{t['worst']:.4f})", t["mean"] >= 0.99),
            (f">= 1.5x ORT dynamic int8 of the same model ({fast:.2f}x paired over "
             f"{args.rounds} rounds, quartiles {lo:.2f}-{hi:.2f}x; ratio of the overall "
             f"medians {med['ort-dynamic-int8'] / med[sel]:.2f}x)", fast >= 1.5),
            (f"served file <= 20% of fp32 ({100 * s['size'] / fp32_size:.1f}%)",
             s["size"] <= 0.20 * fp32_size),
        ]
    else:
        base_q = rowsinfo["onnx-fp32"]["test"]["accuracy"]
        checks = [
            (f">= 4x smaller served file ({fp32_size / s['size']:.2f}x)",
             fp32_size / s["size"] >= 4),
            (f"<= 1 point test accuracy drop ({100 * (base_q - t['accuracy']):.2f} points)",
             base_q - t["accuracy"] <= 0.01 + 1e-9),
        ]
    for text, ok in checks:
        print(f"target {'met   ' if ok else 'MISSED'}: selected {sel}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
