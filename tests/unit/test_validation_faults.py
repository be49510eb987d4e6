"""Faults of simulate and compress: a trace with a huge time gap is refused at once (bounded
work), and a full disk leaves no half-written result looking complete (write to a temporary file
in the same folder, fsync, os.replace), with one clear line from the CLI."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from leanserve import fsio
from leanserve.autoscaling.errors import TraceError
from leanserve.autoscaling.policy import PoolCapacity, Target
from leanserve.autoscaling.simulate import (
    MAX_MIXES,
    MAX_TICKS,
    Trace,
    check_bounded,
    simulate,
    ticks,
)
from leanserve.cli import app

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "examples" / "minilm-cpu.yaml"
runner = CliRunner()


def write_trace(path: Path, rows: list[tuple[float, float]]) -> Path:
    path.write_text("time_s,requests_per_s\n" + "".join(f"{t},{r}\n" for t, r in rows))
    return path


# --------------------------------------------------------------------------------------------
# bounded work


def test_huge_time_gap_is_refused_at_once(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "gap.csv", [(0, 5), (10, 8), (1e12, 3)])
    t0 = time.monotonic()
    result = runner.invoke(app, ["simulate", "--trace", str(trace), "--spec", str(SPEC),
                                 "--out", str(tmp_path / "out")], env={"COLUMNS": "400"})
    assert time.monotonic() - t0 < 10
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"more than the {MAX_TICKS} the simulator replays" in result.output
    assert "largest gap is 1e+12 s (from time_s 10 to 1e+12)" in result.output
    assert not (tmp_path / "out" / "simulation.json").exists()


def test_long_trace_without_one_gap_says_shorten() -> None:
    tr = Trace(tuple(float(i) for i in range(0, 1_200_000, 100)),
               tuple(1.0 for _ in range(12_000)))  # 240,000 intervals of 5 s
    with pytest.raises(TraceError, match="shorten or split the trace"):
        check_bounded(tr, [PoolCapacity("a", 10, 0.1)], Target(100, 1, 4, interval_seconds=5))


def test_peak_rps_rescales_a_shape_and_refuses_what_has_no_peak(tmp_path: Path) -> None:
    shape = write_trace(tmp_path / "shape.csv", [(0, 0.1), (60, 1.5), (120, 0.3)])
    result = runner.invoke(app, ["simulate", "--trace", str(shape), "--spec", str(SPEC),
                                 "--out", str(tmp_path / "out"), "--peak-rps", "3000",
                                 "--startup-seconds", "30"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "trace rescaled: peak 3000 req/s" in result.output
    sim = json.loads((tmp_path / "out" / "simulation.json").read_text())
    # 3000 req/s needs more than one replica of any pool the spec names, 1.5 req/s does not
    assert sim["policies"]["oracle"]["max_replicas"] > 1
    tr = Trace((0.0, 60.0, 120.0), (0.1, 1.5, 0.3)).scaled_to_peak(3000)
    assert tr.rates == pytest.approx((200.0, 3000.0, 600.0))
    with pytest.raises(TraceError, match="all zeros"):
        Trace((0.0, 60.0), (0.0, 0.0)).scaled_to_peak(10)
    for bad in ("0", "-3", "nan", "1e12"):
        result = runner.invoke(app, ["simulate", "--trace", str(shape), "--spec", str(SPEC),
                                     "--out", str(tmp_path / "bad"), "--peak-rps", bad])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert "peak" in result.output, result.output


def test_too_many_replica_mixes_are_refused() -> None:
    pools = [PoolCapacity(n, 10, 0.1) for n in "abc"]
    tr = Trace((0.0, 5.0), (1.0, 2.0))
    with pytest.raises(TraceError, match=f"more than {MAX_MIXES} replica mixes"):
        simulate(tr, pools, Target(100, 1, 1000, interval_seconds=5))


def test_a_trace_at_the_limit_still_runs_quickly() -> None:
    tr = Trace((0.0, 30.0 * 200), (5.0, 9.0))  # one gap; the last point is held as long
    target = Target(100, 1, 4, interval_seconds=30)
    t0 = time.monotonic()
    sim = simulate(tr, [PoolCapacity("a", 10, 0.1)], target, only=("leanserve", "oracle"))
    assert len(sim.runs["leanserve"].met) == ticks(tr, target) == 400
    assert time.monotonic() - t0 < 10


# --------------------------------------------------------------------------------------------
# a full disk


class FullDisk:
    """An ``open`` for leanserve.fsio whose files take ``room`` bytes in all, then fail with
    ENOSPC (what the kernel does when the disk fills mid-write: part is written)."""

    def __init__(self, room: int) -> None:
        self.room, self.failed = room, 0

    def __call__(self, file: Any, mode: str = "r") -> Any:
        disk, real = self, io.open(file, mode)  # noqa: UP020, SIM115 - the real open, wrapped

        class Filling:
            def __enter__(self) -> Filling:
                return self

            def __exit__(self, *exc: object) -> None:
                real.close()

            def write(self, data: bytes) -> int:
                take = max(0, min(len(data), disk.room))
                real.write(data[:take])
                disk.room -= take
                if take < len(data):
                    disk.failed += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return take

        return Filling()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name)


def test_fsio_write_leaves_the_old_file_or_nothing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "result.json"
    fsio.write_text(target, "old, complete\n")
    disk = FullDisk(room=4)
    monkeypatch.setattr(fsio, "open", disk, raising=False)
    with pytest.raises(fsio.WriteError, match=r"result\.json: the disk is full; nothing was"):
        fsio.write_text(target, "new and much longer than four bytes\n")
    assert disk.failed == 1
    assert target.read_text() == "old, complete\n" and leftovers(tmp_path) == []
    with pytest.raises(fsio.WriteError):
        fsio.write_text(tmp_path / "fresh.json", "x" * 100)
    assert not (tmp_path / "fresh.json").exists() and leftovers(tmp_path) == []


def test_simulate_on_a_full_disk_leaves_no_simulation_json(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    trace = write_trace(tmp_path / "t.csv", [(i * 30, 5 + i % 7) for i in range(40)])
    out = tmp_path / "out"
    args = ["simulate", "--trace", str(trace), "--spec", str(SPEC), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    assert (out / "simulation.json").exists()
    # the plot is written first: the disk fills while matplotlib writes it
    wrote: list[Path] = []

    def savefig(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        Path(fname).write_bytes(b"\x89PNG\r\n partial")
        wrote.append(Path(fname))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", savefig)
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert wrote and wrote[0].parent == out and wrote[0].name != "simulation.png"
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "simulation.png: the disk is full" in result.output
    # the previous run's simulation.json is gone (it no longer matches), no new one appeared
    assert not (out / "simulation.json").exists() and leftovers(out) == []


def test_simulate_disk_full_at_the_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = write_trace(tmp_path / "t.csv", [(i * 30, 5 + i % 7) for i in range(40)])
    out = tmp_path / "out"
    disk = FullDisk(room=100)  # the plot is written by matplotlib and fits; the JSON does not
    monkeypatch.setattr(fsio, "open", disk, raising=False)
    result = runner.invoke(app, ["simulate", "--trace", str(trace), "--spec", str(SPEC),
                                 "--out", str(out)], env={"COLUMNS": "400"})
    assert disk.failed == 1 and result.exit_code == 1 and "Traceback" not in result.output
    assert "simulation.json: the disk is full" in result.output
    assert (out / "simulation.png").exists()
    assert not (out / "simulation.json").exists() and leftovers(out) == []


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG


def test_simulate_under_a_real_file_size_limit(tmp_path: Path) -> None:
    """The kernel refuses the writes (RLIMIT_FSIZE): a real fault, no patching."""
    trace = write_trace(tmp_path / "t.csv", [(i * 30, 5 + i % 7) for i in range(40)])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400",
           "MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "leanserve", "simulate", "--trace", str(trace), "--spec",
         str(SPEC), "--out", str(out)], capture_output=True, text=True, env=env, timeout=120,
        preexec_fn=_limit_file_size, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "cannot write" in proc.stderr and "larger than allowed" in proc.stderr
    assert not (out / "simulation.json").exists() and leftovers(out) == []


# --------------------------------------------------------------------------------------------
# compress on a full disk


@pytest.fixture
def tiny_spec(tmp_path: Path):
    from test_compression_fixtures import q, spec_dict, tiny_hf_dir, write_jsonl, write_spec

    tiny_hf_dir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", 24)
    return write_spec(tmp_path, spec_dict("tiny-bert", "data.jsonl", [
        {"name": "int8", "steps": [q("int8-dynamic")]},
        {"name": "fp16", "steps": [q("fp16")]}]))


def test_compress_disk_full_in_a_candidate_stops_and_publishes_nothing(
        tiny_spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from test_compression_fixtures import FAST

    from leanserve.compression import pipeline

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"old": "complete"}\n')
    real_copy = shutil.copyfile
    copies: list[str] = []

    def copyfile(src: Any, dst: Any, **kw: Any) -> Any:
        copies.append(str(dst))
        if len(copies) == 2:  # the second candidate's artifact: the disk is full
            Path(dst).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(src, dst, **kw)

    monkeypatch.setattr(pipeline.shutil, "copyfile", copyfile)
    with pytest.raises(fsio.WriteError, match="the disk is full"):
        pipeline.compress(tiny_spec, out, settings=FAST)
    assert len(copies) == 2  # stopped there: a full disk is not one candidate's error
    assert (out / "report.json").read_text() == '{"old": "complete"}\n'
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no staging left


def test_compress_disk_full_at_the_report(tiny_spec: Any, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from test_compression_fixtures import FAST

    from leanserve.compression import pipeline

    out = tmp_path / "out"
    disk = FullDisk(room=50)
    monkeypatch.setattr(fsio, "open", disk, raising=False)
    with pytest.raises(fsio.WriteError, match="the disk is full"):
        pipeline.compress(tiny_spec, out, settings=FAST)
    assert disk.failed == 1
    assert not (out / "report.json").exists() and list(out.iterdir()) == []


# --------------------------------------------------------------------------------------------
# numbers that overflowed the replica arithmetic (found by the fuzz test)


def test_rates_and_capacities_out_of_range_are_refused(tmp_path: Path) -> None:
    from leanserve.autoscaling.errors import PolicyError
    from leanserve.autoscaling.policy import pools_from_profile
    from leanserve.autoscaling.simulate import load_trace

    with pytest.raises(TraceError, match=r"t\.csv:3: requests_per_s must be <= 1e\+09"):
        load_trace(write_trace(tmp_path / "t.csv", [(0, 1), (5, 1e300)]))
    from leanserve.api import load_one

    spec = load_one(SPEC).spec
    for cap in (5e-324, 1e-300, 1e300):
        with pytest.raises(PolicyError, match=r"capacity_rps .* is out of range"):
            pools_from_profile({"pools": {"cpu-small": {"capacity_rps": cap},
                                          "cpu-large": {"capacity_rps": 10}}}, spec)
    with pytest.raises(TraceError, match="out of range"):
        simulate(Trace((0.0,), (1.0,)), [PoolCapacity("a", 1e-300, 0.1)], Target(100))


def test_a_huge_observed_rate_does_not_overflow_the_policy() -> None:
    from leanserve.autoscaling.policy import cheapest_pool

    pools = [PoolCapacity("a", 1e-6, 0.1), PoolCapacity("b", 10, 0.4)]
    mix, feasible = cheapest_pool(1.7e308, pools, Target(100, 1, 4), 0.99)
    assert not feasible and sum(mix.values()) <= 4


@pytest.mark.parametrize("startup", [1e300, math.inf, math.nan, -1.0])
def test_start_up_beyond_a_day_is_refused(startup: float) -> None:
    from leanserve.autoscaling.simulate import SimConfig

    with pytest.raises(TraceError, match=r"startup_seconds must be within 0\.\.86400"):
        simulate(Trace((0.0, 30.0), (1.0, 2.0)), [PoolCapacity("a", 10, 0.1)],
                 Target(100, 1, 4, interval_seconds=30), SimConfig(startup_seconds=startup))
