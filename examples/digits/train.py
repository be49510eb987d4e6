"""Train the small CNN of examples/digits-cnn.yaml on scikit-learn's 8x8 digits.

Writes, next to this file:
- model.pt: the CNN as TorchScript (the spec's format: torchscript). It is an nn.Sequential of
  standard layers, which is what lets pruning and low-rank rebuild an editable eager copy of it
  (leanserve.compression.prune.editable_copy).
- data.npz: every image as x [N, 1, 8, 8] float32 in [0, 1] and y int64.

It trains only on the rows the pipeline will not hold out (the same split, seed 0 and the
spec's evalFraction 0.3), so the spec's accuracy is measured on unseen images. Deterministic;
a few seconds on 2 cores.

    python examples/digits/train.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from leanserve.compression.loading import Rows, split

HERE = Path(__file__).resolve().parent
EVAL_FRACTION = 0.3  # spec.data.evalFraction of examples/digits-cnn.yaml
SEED = 0


def build() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digits CNN.")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write into")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    train, held_out = split(Rows(x=x, labels=y), EVAL_FRACTION, SEED)
    assert train.x is not None and train.labels is not None
    assert held_out.x is not None and held_out.labels is not None

    net = build()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    xs, ys = torch.from_numpy(train.x), torch.from_numpy(train.labels)
    gen = torch.Generator().manual_seed(SEED)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * (
        (len(xs) + 63) // 64))
    for _ in range(args.epochs):
        net.train()
        perm = torch.randperm(len(xs), generator=gen)
        for start in range(0, len(xs), 64):
            idx = perm[start:start + 64]
            loss = nn.functional.cross_entropy(net(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(held_out.x)).argmax(1).numpy()
    acc = float((pred == held_out.labels).mean())

    args.out.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(net), str(args.out / "model.pt"))
    np.savez_compressed(args.out / "data.npz", x=x, y=y)
    params = sum(p.numel() for p in net.parameters())
    print(f"held-out accuracy {acc:.4f} on {len(held_out)} images; {params} parameters; "
          f"wrote {args.out / 'model.pt'} and {args.out / 'data.npz'}")


if __name__ == "__main__":
    main()
