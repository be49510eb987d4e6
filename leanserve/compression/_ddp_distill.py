"""The distillation worker: one rank of a torch.distributed DDP training run.

Two ways in, one training code (``train_in_group``):

- On one machine, ``distill`` launches ``python -m torch.distributed.run --nproc_per_node=W
  --standalone -m leanserve.compression._ddp_distill --job DIR``: each process reads the
  student's description and weights and the training rows that ``distill.write_job`` left in
  DIR (JSON, safetensors, a tensor-only file loaded with ``weights_only=True``; nothing is
  unpickled) and rank 0 writes DIR/trained.safetensors and DIR/result.json.
- In the cluster, the operator runs ``leanserve compress`` in every pod of an Indexed Job with
  MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK (or JOB_COMPLETION_INDEX) set. Every pod builds
  the same student from the same data and seed, so ``distill`` calls ``train_in_group`` in
  process with the pod's rank and no files travel; DDP keeps the replicas identical, so every
  pod carries on with the same trained student.

The backend is gloo on CPU and nccl when CUDA is present.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leanserve.compression import _ddp_train

RENDEZVOUS_TIMEOUT = timedelta(minutes=10)


def environment() -> tuple[int, int] | None:
    """(rank, world size) from the environment a launcher set, or None when there is none."""
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    rank = os.environ.get("RANK", os.environ.get("JOB_COMPLETION_INDEX"))
    if rank is None:
        return None
    return int(rank), int(os.environ["WORLD_SIZE"])


def _to(data: _ddp_train.TrainData, device: torch.device) -> _ddp_train.TrainData:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return _ddp_train.TrainData(inputs={k: v.to(device) for k, v in data.inputs.items()},
                                targets=data.targets.to(device), labels=move(data.labels),
                                token_targets=move(data.token_targets))


def train_in_group(student: nn.Module, data: _ddp_train.TrainData, tc: _ddp_train.TrainConfig,
                   rank: int, world: int, teacher: nn.Module | None = None
                   ) -> tuple[list[float], str]:
    """Join the process group as ``rank``, train ``student`` in place on this rank's shard,
    and leave the group. Returns the loss per epoch averaged over ranks, and the backend."""
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=RENDEZVOUS_TIMEOUT)
    ddp: DistributedDataParallel | None = None
    try:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda
                              else "cpu")
        student.to(device)
        if teacher is not None:
            teacher.to(device)
        if use_cuda:
            data = _to(data, device)
        for p in student.parameters():
            p.requires_grad_(True)
        _ddp_train.freeze_unused(student, data, tc.task, teacher=teacher)
        if tc.freeze_embeddings:
            _ddp_train.freeze_embeddings(student)
        ddp = DistributedDataParallel(student, device_ids=[device.index] if use_cuda else None)
        losses = _ddp_train.train(ddp, data, tc, rank=rank, world=world, params=student,
                                  teacher=teacher)
        mean = torch.tensor(losses, device=device)
        dist.all_reduce(mean)
        mean /= world
        dist.barrier()
        student.to("cpu")
        if teacher is not None:
            teacher.to("cpu")
        return mean.tolist(), backend
    finally:
        # The DDP wrapper's reducer holds the process group. Left to this frame's unwinding,
        # its destructor would run after destroy_process_group, in the caller's frame, and can
        # block in gloo's native code once the peer has gone (seen: rank 1 hung there after
        # rank 0 finished). Free it while the group still exists.
        del ddp
        gc.collect()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from leanserve.compression.distill import load_model_files, read_train_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, required=True, help="directory from write_job")
    args = parser.parse_args(argv)
    job: Path = args.job
    where = environment()
    if where is None:
        parser.error("run under torchrun or with MASTER_ADDR, WORLD_SIZE and RANK set")
    rank, world = where
    tc, threads = read_train_config(job)
    torch.set_num_threads(threads)
    student = load_model_files(job, "student")
    teacher = load_model_files(job, "teacher").eval() if tc.uses_teacher else None
    data = _ddp_train.TrainData.load(job / "data.pt")
    losses, backend = train_in_group(student, data, tc, rank, world, teacher=teacher)
    if rank == 0:
        state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(job / "trained.safetensors"))
        (job / "result.json").write_text(json.dumps(
            {"losses": losses, "world_size": world, "backend": backend}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
