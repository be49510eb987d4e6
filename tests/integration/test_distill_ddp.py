"""Distillation under torchrun: two gloo processes train one student through files."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from leanserve.api.spec import DistillStep, Task
from leanserve.compression import _ddp_train
from leanserve.compression.distill import DistillError, distill, run_torchrun, write_job
from leanserve.compression.modules import TextEncoder
from leanserve.compression.registry import Batch, Context, Model

#: A hard bound per test (pytest-timeout interrupts the test's own waits; every process a
#: test starts is killed in its ``finally``): each takes seconds to a minute on 2 idle cores.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

#: How long torchrun may train here before ``run_torchrun`` stops it and every worker
#: (distill's own bound is an hour, for real jobs).
TORCHRUN_TIMEOUT_S = 240.0


def tiny_text() -> TextEncoder:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    return TextEncoder(BertModel(cfg).eval()).eval()


def rows(n: int = 4, size: int = 16) -> list[Batch]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (size, 10), generator=gen)
        out.append(Batch(inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    return out


def mean_cos(a: nn.Module, b: nn.Module, data: list[Batch]) -> float:
    with torch.no_grad():
        return float(torch.cat([nn.functional.cosine_similarity(a(**x.inputs), b(**x.inputs))
                                for x in data]).mean())


def test_two_workers_train_the_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    from leanserve.compression import distill as distill_mod

    # a hung worker fails this test in minutes, with torchrun's log, and is killed
    monkeypatch.setattr(distill_mod, "run_torchrun",
                        functools.partial(run_torchrun, timeout_s=TORCHRUN_TIMEOUT_S))
    teacher = tiny_text()
    data = rows()
    ctx = Context(task=Task.FEATURE_EXTRACTION, train=data, teacher=teacher, workdir=tmp_path)
    # the hidden-state and relation losses need the teacher in every worker: it travels too
    cfg = DistillStep(student_layers=2, epochs=6, learning_rate=1e-3, batch_size=8, workers=2,
                      hidden_weight=1.0, relation_weight=1.0, relation_heads=4)
    start = distill(Model(module=teacher), cfg.model_copy(update={"workers": 1,
                                                                  "learning_rate": 1e-9}), ctx)
    out = distill(Model(module=teacher), cfg, ctx)
    result = json.loads((tmp_path / "distill-job" / "result.json").read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert (tmp_path / "distill-job" / "teacher.safetensors").exists()
    assert out.notes["distill_workers"] == 2 and out.notes["distill_mode"] == "torchrun"
    assert out.notes["distill_losses"][1:] == ["hidden-state", "attention-relation"]
    losses = out.notes["distill_loss"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # rank 0's weights were loaded back and improve on the untrained student
    assert mean_cos(out.module, teacher, data) > mean_cos(start.module, teacher, data)
    assert len(out.module.backbone.encoder.layer) == 2


def test_worker_failure_is_reported_and_reaped(tmp_path: Path) -> None:
    teacher = tiny_text()
    data = _ddp_train.collect(rows(n=1), teacher)
    tc = _ddp_train.TrainConfig(task=Task.FEATURE_EXTRACTION, epochs=1, learning_rate=1e-3)
    write_job(tmp_path, teacher, data, tc, threads=1)
    (tmp_path / "student.safetensors").write_bytes(b"not safetensors")  # workers will crash
    with pytest.raises(DistillError, match="DDP training with 2 workers failed"):
        run_torchrun(tmp_path, 2, timeout_s=120)
    assert not (tmp_path / "trained.safetensors").exists()


HUNG_TEARDOWN = """
import json, os, subprocess, sys, time
from pathlib import Path
job = Path(sys.argv[1])
# a "worker" in a session of its own (as torchrun starts them) that never exits
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                          start_new_session=True)
(job / "worker.pid").write_text(str(worker.pid))
(job / "result.json").write_text(json.dumps({"losses": [1.0], "world_size": 2}))
time.sleep(600)  # the launcher waits for its worker forever
"""


def test_a_worker_hung_after_the_result_is_stopped_and_the_result_kept(tmp_path, monkeypatch):
    """Rank 0 wrote result.json, but a worker hangs in its teardown and the launcher waits
    for it: the call returns the result after the grace period, and neither the launcher nor
    the worker (in its own session) outlives it."""
    import sys
    import time

    from leanserve.compression import distill as distill_mod

    script = tmp_path / "launcher.py"
    script.write_text(HUNG_TEARDOWN)
    monkeypatch.setattr(distill_mod, "torchrun_command",
                        lambda job, workers: [sys.executable, str(script), str(job)])
    monkeypatch.setattr(distill_mod, "FINISH_GRACE_S", 1.0)
    t0 = time.monotonic()
    got = run_torchrun(tmp_path, 2, timeout_s=120)
    assert got == {"losses": [1.0], "world_size": 2}
    assert time.monotonic() - t0 < 60
    pid = int((tmp_path / "worker.pid").read_text())
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(50):  # SIGKILLed: gone, or a zombie until something reaps it
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker {pid} outlived run_torchrun")


POD_SCRIPT = """
import faulthandler, json, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks where a hung pod is
from pathlib import Path
import torch
from safetensors.torch import save_file
from leanserve.api.spec import DistillStep, Task
from leanserve.compression.distill import distill
from leanserve.compression.registry import Context, Model
sys.path.insert(0, sys.argv[2])
from test_distill_ddp import rows, tiny_text
torch.set_num_threads(1)
out_dir = Path(sys.argv[1])
teacher = tiny_text()
ctx = Context(task=Task.FEATURE_EXTRACTION, train=rows(), teacher=teacher, workdir=out_dir)
cfg = DistillStep(student_layers=2, epochs=3, learning_rate=1e-3, batch_size=8, workers=2)
out = distill(Model(module=teacher), cfg, ctx)
save_file(dict(out.module.state_dict()), str(out_dir / "student.safetensors"))
(out_dir / "notes.json").write_text(json.dumps(out.notes))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Seconds both pods together may take before they are killed and the test fails.
PODS_TIMEOUT_S = 180.0
PORT_TAKEN = ("EADDRINUSE", "address already in use")


def _run_pods(root: Path) -> tuple[list[int], list[str]]:
    """Two pod processes (ranks 0 and 1) under ``root``: their exit codes and logs. Each runs in
    a session of its own and its whole group is SIGKILLed if the pair outlives
    PODS_TIMEOUT_S, on any error and on the test's own timeout."""
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    # Each pod's output goes to a file: a pipe nobody reads while the other rank is waited on
    # can fill and stall that rank inside a collective, and a hang must leave both logs.
    logs = [root / f"pod{index}.log" for index in range(2)]
    try:
        for index in range(2):
            pod = root / f"pod{index}"
            pod.mkdir(parents=True)
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "WORLD_SIZE": "2", "JOB_COMPLETION_INDEX": str(index), "OMP_NUM_THREADS": "1"}
            env.pop("RANK", None)
            with logs[index].open("wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", POD_SCRIPT, str(pod), str(Path(__file__).parent)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        # Until both exit, or one fails (its peer would wait in the rendezvous for minutes).
        deadline = time.monotonic() + PODS_TIMEOUT_S
        while (any(p.poll() is None for p in procs)
               and all(p.returncode in (None, 0) for p in procs)):
            if time.monotonic() > deadline:
                for p in procs:  # each live pod writes its Python stacks into its log
                    if p.poll() is None:
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(2)
                pytest.fail(f"a pod did not finish within {PODS_TIMEOUT_S:g} s (port {port}):\n"
                            + "\n".join(f"--- pod{i}:\n{log.read_text(errors='replace')[-4000:]}"
                                         for i, log in enumerate(logs)))
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return ([p.returncode for p in procs],
            [log.read_text(errors="replace") for log in logs])


def test_indexed_job_pods_train_together_in_process(tmp_path: Path) -> None:
    """What each pod of the operator's Indexed Job does: `leanserve compress` with
    MASTER_ADDR/WORLD_SIZE and the completion index set, joining DDP without torchrun."""
    from safetensors.torch import load_file

    # The free port is picked here and bound by rank 0 later: if something else took it in
    # between (other tests run beside this one), rank 0 says so and the pair runs again.
    for attempt in range(3):
        codes, outputs = _run_pods(tmp_path / f"try{attempt}")
        if codes == [0, 0] or not any(m in out for out in outputs for m in PORT_TAKEN):
            break
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    tmp_path = tmp_path / f"try{attempt}"
    notes = [json.loads((tmp_path / f"pod{i}" / "notes.json").read_text()) for i in range(2)]
    assert [n["distill_mode"] for n in notes] == ["pods (rank 0)", "pods (rank 1)"]
    assert notes[0]["distill_loss"] == notes[1]["distill_loss"]  # averaged over both ranks
    a, b = (load_file(str(tmp_path / f"pod{i}" / "student.safetensors")) for i in range(2))
    assert a.keys() == b.keys()
    for key in a:  # DDP kept the two replicas identical
        torch.testing.assert_close(a[key], b[key])
    # no torchrun job directory: nothing travelled through files
    assert not (tmp_path / "pod0" / "distill-job").exists()
