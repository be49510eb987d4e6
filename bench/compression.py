"""Compression benchmark: PyTorch fp32 vs ONNX Runtime plain dynamic int8 vs leanserve's pick.

    python bench/compression.py [SPEC] [--out DIR] [--rounds N]

One run of `compress()` on the spec (default examples/minilm-cpu.yaml), then, side by side in
the same process with 2 threads, batch 32 of held-out rows (tokens up to maxSequenceLength):
- PyTorch fp32: the uncompressed torch module (the sentence-transformers computation);
- ORT plain dynamic int8: onnxruntime.quantization.quantize_dynamic on the plain fp32 export
  (no fusions, default settings: what Hugging Face Optimum does);
- every candidate's artifact, the selected one marked;
- each technique alone: every step of a multi-step candidate run as a candidate of its own (a
  second compress() run, never selectable), so a combination's gain can be told apart.
Timing rounds are interleaved (one call of each model per round, median over rounds) so load
from other processes hits all models alike, with a short pause before each call so one model's
spinning thread pool never slows the next. Prints speed ratios, cosine (or accuracy) to the
fp32 outputs on all held-out rows, size ratios, and the issue's targets as met or MISSED.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from leanserve.api.load import LoadedSpec, load_one, parse
from leanserve.api.spec import QualityMetric
from leanserve.compression.benchmark import take_rows
from leanserve.compression.evaluate import mean_cosine
from leanserve.compression.export import export_onnx, run_onnx, session
from leanserve.compression.loading import batches, load_data, load_model, split3
from leanserve.compression.pipeline import Settings, compress

THREADS = 2
BATCH = 32
PAUSE_S = 0.05


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?", default="examples/minilm-cpu.yaml")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-alone", action="store_true",
                    help="skip the run of each technique alone")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    loaded = load_one(args.spec)
    spec = loaded.spec
    out = args.out or Path(tempfile.mkdtemp(prefix="leanserve-bench-"))
    t0 = time.perf_counter()
    report = compress(loaded, out, settings=Settings(threads=THREADS))
    print(f"compress(): {time.perf_counter() - t0:.0f} s, report in {out / 'report.json'}")
    alone = None if args.no_alone else single_steps(loaded)
    alone_report: dict = {"candidates": []}
    if alone is not None:
        t0 = time.perf_counter()
        alone_report = compress(alone, out / "alone", settings=Settings(threads=THREADS))
        print(f"compress() of each technique alone: {time.perf_counter() - t0:.0f} s")

    settings = Settings()
    model = load_model(spec.model.uri, spec.model.format, spec.model.task, loaded.base_dir)
    rows = load_data(spec.data.uri, spec.model.task, loaded.base_dir)
    # quality on the test split: the rows no choice (the gate, a step's setting) ever looked at
    _, _, held_rows = split3(rows, spec.data.eval_fraction, settings.seed)
    held = batches(held_rows, tokenizer=model.tokenizer, max_length=spec.model.max_sequence_length,
                   batch_size=BATCH)
    bench_batch = take_rows(held, BATCH)
    metric = spec.quality.metric
    labels = None if held_rows.labels is None else held_rows.labels

    work = Path(tempfile.mkdtemp(prefix="leanserve-bench-work-"))
    plain = export_onnx(model.module, held[0], work / "plain.onnx", spec.model.task)
    from onnxruntime.quantization import quantize_dynamic

    plain_q = work / "plain-int8.onnx"
    quantize_dynamic(str(plain), str(plain_q))

    with torch.inference_mode():
        ref = np.concatenate([model.module(**b.inputs).numpy() for b in held])

    def torch_call() -> None:
        with torch.inference_mode():
            model.module(**bench_batch.inputs)

    def quality(outputs: np.ndarray) -> float:
        if metric is QualityMetric.ACCURACY and labels is not None:
            return float(np.mean(outputs.argmax(1) == labels))
        return mean_cosine(outputs, ref)

    contenders: dict[str, dict] = {}
    fp32_size = plain.stat().st_size
    contenders["pytorch-fp32"] = {"call": torch_call, "quality": quality(ref),
                                  "size": fp32_size}
    sessions = {"ort-dynamic-int8": plain_q}
    by_name = {c["name"]: c for c in report["candidates"]}
    for c in report["candidates"]:
        if c["artifact"]:
            sessions[c["name"]] = out / c["artifact"]
    for c in alone_report["candidates"]:
        by_name[c["name"]] = c
        if c["artifact"]:
            sessions[c["name"]] = out / "alone" / c["artifact"]
    for name, path in sessions.items():
        sess = session(path, THREADS)
        outputs = np.concatenate([run_onnx(sess, b) for b in held])
        size = by_name[name]["size_bytes"] if name in by_name else path.stat().st_size
        contenders[name] = {"call": (lambda s=sess: run_onnx(s, bench_batch)),
                            "quality": quality(outputs), "size": size}

    for c in contenders.values():  # warm-up
        c["call"]()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, c in contenders.items():
            # Let the previous model's thread pool stop spinning first: ORT's (and OpenMP's)
            # idle threads busy-wait after a call, and on 2 cores they would slow whichever
            # model runs next (measured: 30% slower calls without the pause, order-biased).
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            c["call"]()
            times[name].append(time.perf_counter() - start)
    med = {k: float(np.median(v)) for k, v in times.items()}

    seq = bench_batch.inputs[next(iter(bench_batch.inputs))].shape
    mask = bench_batch.inputs.get("attention_mask")
    real = (f", {100 * float(mask.float().mean()):.0f}% real tokens / "
            f"{100 - 100 * float(mask.float().mean()):.0f}% padding" if mask is not None else "")
    print(f"\n{loaded.name}: batch {BATCH} (input shape {list(seq)}{real}), {THREADS} threads, "
          f"{args.rounds} interleaved rounds, quality = {metric.value} to PyTorch fp32 on "
          f"{len(held_rows)} held-out rows\n")
    head = (f"{'model':<22}{'ms/batch':>10}{'rows/s':>9}{'vs torch':>10}{'vs ort-int8':>12}"
            f"{'quality':>9}{'size MB':>9}{'size %':>8}  steps")
    print(head)
    print("-" * len(head))
    for name, c in contenders.items():
        steps = ", ".join(f"{k}:{v.get('method', '') or ''}".rstrip(":")
                          for st in by_name.get(name, {}).get("steps", []) for k, v in st.items())
        mark = " *selected" if name == report["selected"] else ""
        vs_torch, vs_ort = med["pytorch-fp32"] / med[name], med["ort-dynamic-int8"] / med[name]
        print(f"{name:<22}{med[name] * 1000:>10.1f}{BATCH / med[name]:>9.0f}"
              f"{vs_torch:>9.2f}x{vs_ort:>11.2f}x"
              f"{c['quality']:>9.4f}{c['size'] / 1e6:>9.1f}{100 * c['size'] / fp32_size:>7.1f}%"
              f"  {steps}{mark}")
    for name, c in by_name.items():
        if c["error"]:
            print(f"{name:<22}error: {c['error']}")

    sel = report["selected"]
    print()
    if sel is None:
        print("targets: MISSED (no candidate passed the quality gate)")
        return 0
    s = contenders[sel]
    if metric is QualityMetric.COSINE:
        checks = [
            (f"mean cosine >= 0.99 ({s['quality']:.4f})", s["quality"] >= 0.99),
            (f">= 2.2x faster than PyTorch fp32 ({med['pytorch-fp32'] / med[sel]:.2f}x)",
             med["pytorch-fp32"] / med[sel] >= 2.2),
            (f">= 1.2x faster than ORT dynamic int8 ({med['ort-dynamic-int8'] / med[sel]:.2f}x)",
             med["ort-dynamic-int8"] / med[sel] >= 1.2),
            (f"<= 25% of fp32 size ({100 * s['size'] / fp32_size:.1f}%)",
             s["size"] <= 0.25 * fp32_size),
        ]
    else:
        base_q = contenders["pytorch-fp32"]["quality"]
        checks = [
            (f">= 4x smaller ({fp32_size / s['size']:.2f}x)", fp32_size / s["size"] >= 4),
            (f"<= 1 point accuracy drop ({100 * (base_q - s['quality']):.2f} points)",
             base_q - s["quality"] <= 0.01 + 1e-9),
        ]
    for text, ok in checks:
        print(f"target {'met   ' if ok else 'MISSED'}: selected {sel}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
