"""Operator benchmark: 200 CompressedModels applied at once against kmock's emulator.

Runs the real `leanserve operator` as a child process (so its RSS is its own) with KUBECONFIG
pointing at an in-process KubernetesEmulator, applies N models at once, and measures until every
one has its compression Job and status phase Compressing. Prints reconciles per second (from the
operator's own metrics endpoint), Jobs per second and the child's peak RSS against the 200 MiB
target, side by side in one run.

    python bench/operator.py [--models 200]
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


async def main(n: int) -> None:
    async with emulator() as c:
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
            t0 = time.perf_counter()
            await asyncio.gather(*(c.kube.create(model_body(f"m{i:03d}")) for i in range(n)))
            done = 0
            while time.perf_counter() - t0 < 300:
                jobs = await c.kube.list(Kinds.JOB, NS, {})
                done = len({j["metadata"]["labels"][Label.MODEL.value] for j in jobs})
                models = await c.kube.list(Kinds.COMPRESSED_MODEL, NS, {})
                compressing = sum((m.get("status") or {}).get("phase") == "Compressing"
                                  for m in models)
                if done >= n and compressing >= n:
                    break
                await asyncio.sleep(0.2)
            t_jobs = time.perf_counter() - t0
            reconciles = await scrape(metrics_port, "leanserve_operator_reconciles_total")
            jobs_created = await scrape(metrics_port, "leanserve_operator_jobs_created_total")
            rss = peak_rss_mib(proc.pid)
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
        print(f"models applied at once        {n}")
        print(f"models with their Job         {done}  (Jobs created: {jobs_created:.0f}, "
              f"duplicates: {jobs_created - done:.0f})")
        print(f"time until all Jobs+status    {t_jobs:.2f} s")
        print(f"reconciles                    {reconciles:.0f}  "
              f"({reconciles / t_jobs:.1f} reconciles/s)")
        print(f"Jobs per second               {done / t_jobs:.1f}")
        print(f"operator peak RSS             {rss:.1f} MiB (idle {idle_rss:.1f} MiB; "
              f"target <= {TARGET_MIB} MiB: ratio {rss / TARGET_MIB:.2f})")
        print(f"operator log                  {tmp / 'operator.log'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=int, default=200)
    asyncio.run(main(p.parse_args().models))
