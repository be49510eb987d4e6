"""Distillation of the digits CNN into thinner copies of itself (distill.studentWidth): what
hard labels, soft targets and a FitNets hint loss give, against structured channel pruning of
the same width.

    python examples/digits/train.py          # once: the digits CNN and its data
    python bench/distill_cnn.py [SPEC] [--widths 0.5 0.25] [--out DIR] [--rounds N]

1. Settings are chosen on the VALIDATION split only (the pipeline's split3 of the spec's data,
   seed 0; the test split is never looked at here): for each width and each loss,
   - hard: alpha 0 (cross-entropy on the labels only),
   - soft: the seeds' loss (soft targets at temperature T, alpha 0.5, plus hard labels),
   - hint: soft + hiddenWeight 1 (each hidden layer's output on its kept channels),
   every learning rate x epochs (x T for soft and hint) of the grid below trains a student from
   the spec's training rows (the distill step itself, 2 threads) and is scored by its torch
   accuracy on validation; the best (ties: fewer epochs, then the lower rate) is kept.
2. The chosen students, and ``prune`` (structured, channel, l2, sparsity 1 - width, 2
   iterations with 2 fine-tuning epochs each: the example's setting) as the reference, are
   written as a candidates file and measured by bench/compression.py in one run beside the
   fp32 ONNX baseline: validation and TEST accuracy, served size and paired speed ratios.

Note that channel pruning thins only the Conv2d layers; a width student also thins the hidden
Linear (64 -> 32 or 16 units), so at the same width it is smaller.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from leanserve.api.load import load_one
from leanserve.api.spec import DistillStep
from leanserve.compression.distill import distill
from leanserve.compression.loading import LoadError, batches, load_data, load_model, split3
from leanserve.compression.pipeline import Settings
from leanserve.compression.registry import Batch, Context, Model

THREADS = 2
LEARNING_RATES = (3e-3, 1e-2)
EPOCHS = (10, 30)
TEMPERATURES = (2.0, 4.0)
LOSSES: dict[str, dict[str, Any]] = {
    "hard": {"alpha": 0.0},
    "soft": {"alpha": 0.5},
    "hint": {"alpha": 0.5, "hiddenWeight": 1.0},
}


@torch.no_grad()
def accuracy(module: torch.nn.Module, part: list[Batch]) -> float:
    right = sum(int((module(**b.inputs).argmax(1) == b.labels).sum()) for b in part)
    return right / sum(len(b.labels) for b in part)  # type: ignore[arg-type]


def grid(loss: str) -> list[dict[str, Any]]:
    temps = (None,) if loss == "hard" else TEMPERATURES
    out = []
    for epochs, lr, t in itertools.product(EPOCHS, LEARNING_RATES, temps):
        out.append({**LOSSES[loss], "epochs": epochs, "learningRate": lr,
                    **({"temperature": t} if t is not None else {})})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="examples/digits-cnn.yaml")
    ap.add_argument("--widths", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    out = args.out or Path(tempfile.mkdtemp(prefix="leanserve-distill-cnn-"))
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_one(Path(args.spec))
    spec = loaded.spec
    s = Settings()
    try:
        model = load_model(spec.model.uri, spec.model.format, spec.model.task, loaded.base_dir)
    except LoadError as exc:
        print(f"error: {exc}; make the digits model and data first: python "
              "examples/digits/train.py", file=sys.stderr)
        return 2
    rows = load_data(spec.data.uri, spec.model.task, loaded.base_dir)
    train_rows, val_rows, _ = split3(rows, spec.data.eval_fraction, s.seed)  # test: not here
    kw = {"tokenizer": None, "max_length": spec.model.max_sequence_length,
          "batch_size": s.batch_size}
    train, val = batches(train_rows, **kw), batches(val_rows, **kw)
    teacher = model.module
    assert teacher is not None
    print(f"teacher validation accuracy {accuracy(teacher, val):.4f} ({len(val_rows)} rows; "
          f"{len(train_rows)} training rows)", flush=True)
    candidates: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    for width in args.widths:
        for loss in LOSSES:
            best: tuple[float, int, float, dict[str, Any]] | None = None
            for setting in grid(loss):
                cfg = DistillStep.model_validate({"studentWidth": width, **setting})
                with tempfile.TemporaryDirectory() as tmp:
                    ctx = Context(task=spec.model.task, train=train, teacher=teacher,
                                  workdir=Path(tmp), seed=s.seed, threads=THREADS)
                    started = time.monotonic()
                    student = distill(Model(module=teacher), cfg, ctx).module
                    seconds = time.monotonic() - started
                assert student is not None
                acc = accuracy(student, val)
                sweep.append({"width": width, "loss": loss, **setting, "validation": acc,
                              "seconds": round(seconds, 1)})
                print(json.dumps(sweep[-1]), flush=True)
                key = (acc, -setting["epochs"], -setting["learningRate"], setting)
                if best is None or key[:3] > best[:3]:
                    best = key
            assert best is not None
            candidates.append({"name": f"distill-{loss}-w{round(width * 100)}",
                               "steps": [{"distill": {"studentWidth": width, **best[3]}}]})
        candidates.append({"name": f"prune-w{round(width * 100)}", "steps": [{"prune": {
            "method": "structured", "granularity": "channel", "importance": "l2",
            "sparsity": round(1 - width, 6), "iterations": 2, "fineTuneEpochs": 2}}]})
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sweep))
    chosen = out / "candidates.yaml"
    chosen.write_text(yaml.safe_dump(candidates, sort_keys=False))
    print(f"\nchosen on validation ({chosen}):\n{chosen.read_text()}", flush=True)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import compression  # bench/compression.py

    code = compression.main([args.spec, "--candidates", str(chosen), "--out",
                             str(out / "compress"), "--no-alone", "--rounds", str(args.rounds)])
    report = json.loads((out / "compress" / "report.json").read_text())
    print(f"\n{'candidate':<22}{'params':>14}{'units per hidden layer':>26}{'train CPU s':>13}")
    for c in report["candidates"]:
        n = c["notes"]
        kept = n.get("kept_units_per_layer") or n.get("kept_channels_per_layer")
        cpu = (c.get("cost") or {}).get("cpu_seconds")
        print(f"{c['name']:<22}{n.get('params_after', 0):>7}/{n.get('params_before', 0):<6}"
              f"{kept!s:>26}{cpu if cpu is None else round(cpu, 1)!s:>13}")
    return code


if __name__ == "__main__":
    sys.exit(main())
