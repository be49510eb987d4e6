"""The distillation worker that torchrun (or one pod of an Indexed Job) runs.

``python -m leanserve.compression._ddp_distill --job DIR`` reads the student's description and
weights and the training rows that ``distill.write_job`` left in DIR, joins the process group
from the usual environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK; RANK falls back to
JOB_COMPLETION_INDEX, which an Indexed Job sets), trains its shard of the rows under DDP (gloo
on CPU, nccl when CUDA is present) and rank 0 writes DIR/trained.safetensors and
DIR/result.json. Nothing here is unpickled: weights are safetensors, rows are loaded with
``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from leanserve.compression import _ddp_train
from leanserve.compression.distill import build_from_description, read_train_config

RENDEZVOUS_TIMEOUT = timedelta(minutes=10)


def _environment() -> tuple[int, int]:
    if "RANK" not in os.environ and "JOB_COMPLETION_INDEX" in os.environ:
        os.environ["RANK"] = os.environ["JOB_COMPLETION_INDEX"]
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, required=True, help="directory from write_job")
    args = parser.parse_args(argv)
    job: Path = args.job
    rank, world = _environment()
    tc, threads = read_train_config(job)
    torch.set_num_threads(threads)
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            timeout=RENDEZVOUS_TIMEOUT)
    try:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda
                              else "cpu")
        student = build_from_description(json.loads((job / "student.json").read_text()))
        student.load_state_dict(load_file(str(job / "student.safetensors")))
        student.to(device)
        data = _ddp_train.TrainData.load(job / "data.pt")
        if use_cuda:
            data = _ddp_train.TrainData(
                inputs={k: v.to(device) for k, v in data.inputs.items()},
                targets=data.targets.to(device),
                labels=None if data.labels is None else data.labels.to(device))
        for p in student.parameters():
            p.requires_grad_(True)
        _ddp_train.freeze_unused(student, data, tc.task)
        ddp = DistributedDataParallel(student, device_ids=[device.index] if use_cuda else None)
        losses = _ddp_train.train(ddp, data, tc, rank=rank, world=world, params=student)
        # average what every rank saw, so the report shows the loss of the whole data
        mean = torch.tensor(losses, device=device)
        dist.all_reduce(mean)
        mean /= world
        if rank == 0:
            state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
            save_file(state, str(job / "trained.safetensors"))
            (job / "result.json").write_text(json.dumps(
                {"losses": mean.tolist(), "world_size": world,
                 "backend": dist.get_backend()}))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
