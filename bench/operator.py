"""Operator benchmark: 200 CompressedModels applied at once against kmock's emulator.

Runs the real `leanserve operator` as a child process (so its RSS is its own) with KUBECONFIG
pointing at an in-process KubernetesEmulator, applies N models at once, and measures until every
one has its compression Job and status phase Compressing. Prints reconciles per second (from the
operator's own metrics endpoint), Jobs per second, API requests per model and the child's peak
RSS against the 200 MiB target, side by side in one run.

The emulator is the tests' ``ForgetfulEmulator``: stock kmock keeps every request it served
and walks that whole log to route each new one, so its cost per request grows with the number
of requests before it (quadratic in total). ``--evidence`` measures that first, side by side
(stock vs forgetful, mean latency of early vs late requests against one object); ``--stock``
runs the whole benchmark on stock kmock.

    python bench/operator.py [--models 200] [--evidence] [--stock]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanserve.operator.constants import Label
from leanserve.operator.kube import Kinds
from tests.integration.test_operator_emulator import (
    NS,
    Cluster,
    emulator,
    model_body,
)

TARGET_MIB = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else float("nan")


async def scrape(port: int, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split("{")[0].split(" ")[0] == name)


def count(c: Cluster) -> tuple[int, int]:
    """Models with a Job, and models whose status says Compressing: read in process, not over
    HTTP, so measuring adds no load to the emulator the operator talks to."""
    with_job, compressing = set(), 0
    for (resource, _, _), obj in list(c.emulator.objects.items()):
        if obj.deleted:
            continue
        if resource.plural == "jobs":
            with_job.add(obj.raw["metadata"]["labels"][Label.MODEL.value])
        elif resource.plural == "compressedmodels":
            compressing += (obj.raw.get("status") or {}).get("phase") == "Compressing"
    return len(with_job), compressing


class Timed:
    """Requests the emulator served and the time it spent on them (server side)."""

    def __init__(self, c: Cluster) -> None:
        self.n, self.seconds = 0, 0.0
        inner = c.emulator._handle

        async def handle(request: object) -> object:
            t = time.perf_counter()
            try:
                return await inner(request)
            finally:
                if getattr(request, "action", None) is not None and \
                        "watch" not in str(getattr(request, "action", "")).lower():
                    self.n += 1
                    self.seconds += time.perf_counter() - t
        c.emulator._handle = handle  # type: ignore[method-assign]


async def evidence(requests: int = 400) -> None:
    """Latency of GET one object: first vs last 50 of `requests`, stock vs forgetful kmock."""
    rows = []
    for stock in (True, False):
        async with emulator(stock=stock) as c:
            await c.kube.create(model_body("probe"))
            times = []
            for _ in range(requests):
                t = time.perf_counter()
                await c.kube.get(Kinds.COMPRESSED_MODEL, NS, "probe")
                times.append(time.perf_counter() - t)
        early, late = sum(times[:50]) / 50 * 1e3, sum(times[-50:]) / 50 * 1e3
        rows.append((stock, early, late))
    print(f"kmock GET latency, one object, {requests} sequential requests:")
    for stock, early, late in rows:
        print(f"  {'stock kmock     ' if stock else 'ForgetfulEmulator'}  requests 1-50: "
              f"{early:6.2f} ms   requests {requests - 49}-{requests}: {late:6.2f} ms   "
              f"(late/early {late / early:.1f}x)")
    print(f"  stock/forgetful at the end: {rows[0][2] / rows[1][2]:.1f}x")


async def main(n: int, stock: bool) -> None:
    async with emulator(stock=stock) as c:
        timed = Timed(c)
        kubeconfig = {"apiVersion": "v1", "kind": "Config",
                      "clusters": [{"name": "kmock", "cluster": {"server": c.url}}],
                      "users": [{"name": "u", "user": {}}],
                      "contexts": [{"name": "kmock", "context": {"cluster": "kmock",
                                                                  "user": "u"}}],
                      "current-context": "kmock"}
        tmp = Path(tempfile.mkdtemp(prefix="leanserve-bench-"))
        (tmp / "config").write_text(yaml.safe_dump(kubeconfig))
        metrics_port = free_port()
        env = {**os.environ, "KUBECONFIG": str(tmp / "config"),
               "LEANSERVE_OPERATOR_METRICS_PORT": str(metrics_port),
               "LEANSERVE_OPERATOR_LIVENESS_PORT": str(free_port()),
               "LEANSERVE_OPERATOR_RESYNC_SECONDS": "30"}
        log = (tmp / "operator.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "leanserve.cli", "operator"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(200):  # wait for the metrics endpoint: the operator is up
                try:
                    await scrape(metrics_port, "leanserve_operator_reconciles_total")
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            idle_rss = peak_rss_mib(proc.pid)
            served0, spent0 = timed.n, timed.seconds
            t0 = time.perf_counter()
            await asyncio.gather(*(c.kube.create(model_body(f"m{i:03d}")) for i in range(n)))
            done = compressing = 0
            while time.perf_counter() - t0 < 300:
                done, compressing = count(c)
                if done >= n and compressing >= n:
                    break
                await asyncio.sleep(0.2)
            t_jobs = time.perf_counter() - t0
            reconciles = await scrape(metrics_port, "leanserve_operator_reconciles_total")
            errors = await scrape(metrics_port, "leanserve_operator_errors_total")
            jobs_created = await scrape(metrics_port, "leanserve_operator_jobs_created_total")
            api_requests = await scrape(metrics_port, "leanserve_operator_api_requests")
            rss = peak_rss_mib(proc.pid)
            served, spent = timed.n - served0 - n, timed.seconds - spent0
            if os.environ.get("BENCH_DEBUG"):
                async with aiohttp.ClientSession() as s, \
                        s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                    print(await r.text())
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            log.close()
        print(f"emulator                      {'stock kmock' if stock else 'ForgetfulEmulator'}")
        print(f"models applied at once        {n}")
        print(f"models with their Job         {done}  (Jobs created: {jobs_created:.0f}, "
              f"duplicates: {jobs_created - done:.0f}); status Compressing: {compressing}")
        print(f"time until all Jobs+status    {t_jobs:.2f} s"
              + ("" if done >= n and compressing >= n else "  (TIMED OUT)"))
        print(f"reconciles                    {reconciles:.0f}  "
              f"({reconciles / t_jobs:.1f} reconciles/s; errors: {errors:.0f})")
        print(f"Jobs per second               {done / t_jobs:.1f}")
        print(f"API requests                  operator's own client {api_requests:.0f} "
              f"({api_requests / max(n, 1):.1f} per model); emulator served {served} "
              f"(kopf's included), mean {1e3 * spent / max(served, 1):.1f} ms server-side")
        print(f"operator peak RSS             {rss:.1f} MiB (idle {idle_rss:.1f} MiB; "
              f"target <= {TARGET_MIB} MiB: ratio {rss / TARGET_MIB:.2f})")
        print(f"operator log                  {tmp / 'operator.log'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=int, default=200)
    p.add_argument("--evidence", action="store_true",
                   help="first measure kmock's per-request cost, stock vs forgetful")
    p.add_argument("--stock", action="store_true", help="run on stock kmock (slow beyond ~20)")
    args = p.parse_args()
    if args.evidence:
        asyncio.run(evidence())
    asyncio.run(main(args.models, args.stock))
