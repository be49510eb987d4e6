"""What a recipe costs to run, what it saves in serving, and when it pays for itself.

Compression is not free: a distillation can burn CPU-hours, and a candidate that serves 5%
faster may never earn that back. Every candidate therefore reports

- ``cpu_seconds``: the CPU time its steps, export and evaluation took (this process and any
  worker it started, such as torchrun's; the timing every model shares, run interleaved at the
  end, is not counted), and ``usd`` at the price of a CPU-hour on the
  pool the Job runs on (the cheapest CPU pool of the spec, per core of its cpu request);
- ``gpu_seconds``: where the training steps ran on a CUDA GPU (``precision.training_device``:
  a `leanserve compress` or `run` on a GPU machine; the operator's Job asks for none), the wall
  time its training held GPUs (``precision.gpu_seconds_used``: inside the steps' training
  blocks, and a torchrun distillation's time once per worker; 0 for a candidate that trains
  nothing), priced into ``usd`` at the cheapest GPU pool's price per GPU (``gpu_pool``;
  unpriced, and said so, when the spec has no GPU pool); None without a GPU;
- ``serving``: the cost of one million requests at the benchmark's throughput on the same cores,
  for the candidate and for the baseline, and the saving per million;
- ``payback_requests``: after how many served requests the saving has paid the compression cost
  (null when it saves nothing);
- ``peak_rss_bytes``: the peak resident memory of one serving process (ONNX Runtime session with
  one batch run) beside the file size: fewer parameters do not always mean less memory.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.api.spec import Accelerator, CompressedModelSpec
from leanserve.compression.export import feeds
from leanserve.compression.registry import Batch


@dataclass(frozen=True)
class UnitPrice:
    """What one unit of a resource (a core, a GPU) costs for an hour on the pool cheapest in it."""

    pool: str
    usd_per_hour: float


def _cheapest_unit(spec: CompressedModelSpec, resource: str, *,
                   accelerated: bool) -> UnitPrice | None:
    """The cheapest hour of one ``resource`` unit over the spec's CPU pools (``accelerated``
    False) or accelerator pools (True): a pool's price over the units it requests (or limits
    to; 1 when it names none); None when the spec has no such pool."""
    best: UnitPrice | None = None
    for pool in spec.node_pools:
        if (pool.accelerator is not Accelerator.NONE) != accelerated:
            continue
        res = pool.resources
        units = _cores(res.requests.get(resource) or res.limits.get(resource))
        price = UnitPrice(pool.name, pool.hourly_price / units)
        if best is None or price.usd_per_hour < best.usd_per_hour:
            best = price
    return best


def cpu_price(spec: CompressedModelSpec) -> UnitPrice | None:
    """The price of one core-hour on the cheapest CPU pool (the pool the Job runs on)."""
    return _cheapest_unit(spec, "cpu", accelerated=False)


def gpu_price(spec: CompressedModelSpec) -> UnitPrice | None:
    """The price of one GPU-hour on the cheapest GPU pool."""
    return _cheapest_unit(spec, "nvidia.com/gpu", accelerated=True)


def _cores(quantity: Any) -> float:
    """Units of a Kubernetes quantity ("2", "500m", 1.5; cores or GPUs); 1 when none is given."""
    if quantity is None:
        return 1.0
    text = str(quantity).strip()
    value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return value if value > 0 else 1.0


@contextmanager
def cpu_clock() -> Iterator[list[float]]:
    """CPU seconds spent inside the block, by this process and by children it waited for."""
    spent = [0.0]
    start = time.process_time() + _children()
    try:
        yield spent
    finally:
        spent[0] = time.process_time() + _children() - start


def _children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def per_million(usd_per_hour: float, rps: float | None) -> float | None:
    if not rps or rps <= 0:
        return None
    return usd_per_hour / (rps * 3600.0) * 1e6


def candidate_costs(cpu_seconds: float, price: UnitPrice | None, threads: int,
                    baseline_rps: float | None, rps: float | None, *,
                    gpu_seconds: float | None = None,
                    gpu: UnitPrice | None = None) -> dict[str, Any]:
    """The report's ``cost`` entry of one candidate (see the module docstring)."""
    out: dict[str, Any] = {"cpu_seconds": cpu_seconds, "gpu_seconds": gpu_seconds,
                           "usd": None, "pool": None, "gpu_pool": None,
                           "serving": None, "payback_requests": None}
    if price is None:
        return out
    usd = cpu_seconds / 3600.0 * price.usd_per_hour
    if gpu_seconds and gpu is not None:
        usd += gpu_seconds / 3600.0 * gpu.usd_per_hour
        out["gpu_pool"] = gpu.pool
    hourly = price.usd_per_hour * threads
    base, ours = per_million(hourly, baseline_rps), per_million(hourly, rps)
    out.update(usd=usd, pool=price.pool)
    if base is not None and ours is not None:
        saving = base - ours
        out["serving"] = {"usd_per_million_baseline": base, "usd_per_million": ours,
                          "saving_per_million": saving}
        if saving > 0:
            # rounded first so that float noise never adds a request to an exact quotient
            out["payback_requests"] = int(np.ceil(round(usd / saving * 1e6, 6)))
    return out


_RSS_PROBE = """
import json, sys
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = int(sys.argv[2])
opts.log_severity_level = 3
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
names = {i.name for i in sess.get_inputs()}
feed = {k: v for k, v in np.load(sys.argv[3]).items() if k in names}
sess.run(None, feed)
# VmHWM: the peak of this process image only. getrusage's ru_maxrss is carried over from the
# parent across fork and exec, so it would report the (larger) parent's size.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps(int(hwm.split()[1]) * 1024))
"""


def serving_peak_rss(onnx_path: Path, batch: Batch, threads: int,
                     timeout: float = 120.0) -> int | None:
    """Peak resident bytes of a fresh process that loads ``onnx_path`` in ONNX Runtime and runs
    ``batch`` once: what one serving instance of the model holds, interpreter included. None
    when the probe cannot run (the report says so rather than guessing)."""
    with tempfile.TemporaryDirectory(prefix="leanserve-rss-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, **feeds(batch))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        try:
            done = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(onnx_path),
                                   str(threads), str(inputs)], capture_output=True, text=True,
                                  timeout=timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            return None
    if done.returncode != 0:
        return None
    try:
        return int(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return None


def cost_cells(cost: dict[str, Any] | None) -> tuple[str, str]:
    """What the recipe cost to run, and after how many requests its serving saving repays it
    (a candidate's ``cost`` in report.json; `leanserve run` prints the same words)."""
    if not cost:
        return "-", "-"
    spent = f"{cost['cpu_seconds']:.0f} cpu-s"
    if cost.get("gpu_seconds"):
        spent += f" + {cost['gpu_seconds']:.0f} gpu-s" + (
            "" if cost.get("gpu_pool") else " (unpriced: no GPU pool)")
    if cost.get("usd") is not None:
        spent += f", ${cost['usd']:.4f}"
    if cost.get("payback_requests") is not None:
        return spent, f"{cost['payback_requests']:,} requests"
    return spent, "never (saves nothing)" if cost.get("serving") else "-"
