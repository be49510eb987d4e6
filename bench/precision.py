"""Mixed-precision training benchmark: the training steps of a spec in fp32 and in bf16.

    python examples/digits/train.py          # once: the digits CNN and its data
    python bench/precision.py [SPEC] [--repeats 3]

For every step of the spec (default examples/digits-cnn.yaml) that trains (prune with
fineTuneEpochs, lowRank with fineTuneEpochs, distill, quantize with method qat), the step runs
on the spec's model and training rows once per precision, in alternation (fp32, bf16, fp32,
bf16, ...; 2 threads), and the benchmark prints the result's quality on the validation split
(accuracy, or mean cosine to the teacher for embeddings; for qat, of the int8 ONNX graph it
serves) and the median seconds per precision with their ratio. lowRank steps without
fine-tuning get fineTuneEpochs 2 here, so that there is training to compare.
bf16 on a CPU runs matmuls and convolutions through oneDNN's bf16 kernels where the CPU has
them (AVX512-BF16, AMX); without them it is often slower than fp32, and the ratio says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from leanserve.api.load import load_one
from leanserve.api.spec import Precision, QuantizeMethod, Task
from leanserve.compression import techniques
from leanserve.compression.evaluate import predict
from leanserve.compression.export import export_onnx
from leanserve.compression.loading import batches, load_data, load_model, split3
from leanserve.compression.pipeline import Settings
from leanserve.compression.registry import Batch, Context, Model, lookup

THREADS = 2


@torch.no_grad()
def quality(result: Model, teacher: torch.nn.Module, held: list[Batch], task: Task) -> float:
    """Validation quality of a step's result: its torch module, or the ONNX graph it wrote."""
    if result.module is not None:
        out = torch.cat([result.module(**b.inputs).float() for b in held])
    else:
        assert result.onnx_path is not None
        out = torch.from_numpy(predict(result.onnx_path, held, THREADS))
    if task is Task.FEATURE_EXTRACTION:
        ref = torch.cat([teacher(**b.inputs).float() for b in held])
        return float(torch.nn.functional.cosine_similarity(out, ref).mean())
    labels = torch.cat([b.labels for b in held])
    return float((out.argmax(1) == labels).float().mean())


def training_steps(spec) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    found = []
    for cand in spec.compression.candidates:
        for step in cand.steps:
            cfg = step.config
            if step.kind == "lowRank" and not cfg.fine_tune_epochs:
                cfg = cfg.model_copy(update={"fine_tune_epochs": 2})
            trains = (step.kind == "distill" or getattr(cfg, "fine_tune_epochs", 0) > 0
                      or getattr(cfg, "method", None) is QuantizeMethod.QAT)
            if trains and all(cfg != c for _, c in found):
                found.append((f"{cand.name}:{step.kind}", cfg))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="examples/digits-cnn.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    techniques.load_all()
    torch.set_num_threads(THREADS)
    loaded = load_one(Path(args.spec))
    spec = loaded.spec
    s = Settings()
    model = load_model(spec.model.uri, spec.model.format, spec.model.task, loaded.base_dir)
    rows = load_data(spec.data.uri, spec.model.task, loaded.base_dir)
    train_rows, val_rows, _ = split3(rows, spec.data.eval_fraction, s.seed)
    kw = {"tokenizer": model.tokenizer, "max_length": spec.model.max_sequence_length,
          "batch_size": s.batch_size}
    train, val = batches(train_rows, **kw), batches(val_rows, **kw)
    teacher = model.module
    assert teacher is not None
    base = quality(Model(module=teacher), teacher, val, spec.model.task)

    def to_onnx(m: Model, where: Path) -> Model:  # qat's export: the pipeline's, unfused
        assert m.module is not None
        where.mkdir(parents=True, exist_ok=True)
        return Model(onnx_path=export_onnx(m.module, val[0], where / "model.onnx",
                                           spec.model.task,
                                           pack=s.pack_tokens and spec.model.task.is_text),
                     notes=m.notes)

    print(f"{args.spec}: baseline validation {base:.4f}; {len(train_rows)} training rows; "
          f"{args.repeats} alternating runs per precision, {THREADS} threads")
    print(f"{'step':34} {'fp32 quality':>12} {'bf16 quality':>12} {'fp32 s':>8} {'bf16 s':>8} "
          f"{'bf16/fp32 time':>15}")
    for name, cfg in training_steps(spec):
        got: dict[str, list[float]] = {"fp32": [], "bf16": []}
        secs: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            for prec in ("fp32", "bf16"):
                step = cfg.model_copy(  # type: ignore[attr-defined]
                    update={"precision": Precision(prec)})
                with tempfile.TemporaryDirectory() as tmp:
                    ctx = Context(task=spec.model.task, train=train, teacher=teacher,
                                  workdir=Path(tmp), seed=s.seed, threads=THREADS,
                                  to_onnx=to_onnx)
                    torch.manual_seed(s.seed)
                    started = time.perf_counter()
                    out = lookup(step).transform(Model(module=teacher), step, ctx)
                    secs[prec].append(time.perf_counter() - started)
                    got[prec].append(quality(out, teacher, val, spec.model.task))
        med = {p: statistics.median(v) for p, v in secs.items()}
        q = {p: float(np.mean(v)) for p, v in got.items()}
        print(f"{name:34} {q['fp32']:12.4f} {q['bf16']:12.4f} {med['fp32']:8.2f} "
              f"{med['bf16']:8.2f} {med['bf16'] / med['fp32']:14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
