"""Operator benchmark on the real control plane (scripts/control-plane.sh): issue 14 item 14.

Starts a control plane, installs the CRD and deploy/operator, runs `leanserve operator` as a
child process with the operator ServiceAccount's token and the shipped settings (resync 300 s),
creates N CompressedModels at once and measures:
- the time until every model has its Job and status phase Compressing (target: 5,000 in 10 min);
- the steady state afterwards: the operator's API requests per model per minute (its own
  client's count, from its metrics; kopf's watches are long-lived streams, not requests), over
  ``--steady`` seconds (target: <= 2);
- the operator's peak RSS.

With ``--serving`` the bench then finishes every Job as a kubelet would, with the termination
message a successful `leanserve compress` Job leaves (leanserve.operator.handback: a passing
int8 candidate and a profile, so the autoscaler runs), waits until every model is Serving (kwok
makes the serving pods Ready) and its autoscaler has stepped once (its first decision is
written then), and measures the steady state again: the figure issue 13 asks for. No
Prometheus runs: every step finds no metrics (condition Autoscaling=False, MetricsUnavailable)
and holds, which costs the cluster what a steady load costs it. The autoscaler writes status
at least every 300 s and the children are re-applied every 600 s (reapply_seconds): a
``--steady`` shorter than that leaves those out; 660 s takes them in.
No compression runs (1,000 MiniLM compressions do not fit on 2 cores); the operator cannot tell.

    python bench/operator_cluster.py [--models 500] [--steady 60] [--serving]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

from clusterlib import (  # noqa: E402
    OperatorProcess,
    install_crd,
    install_operator,
    pv_and_claim,
    service_account_kubeconfig,
)
from conftest import ControlPlane, binaries_dir  # noqa: E402
from kubeapi import Api  # noqa: E402

SCRIPT = ROOT / "scripts" / "control-plane.sh"
NS = "bench"


class Shipped(OperatorProcess):
    """The tests' operator process, with the shipped resync (the tests shorten it to 2 s)."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        import clusterlib
        original = clusterlib.python_env

        def shipped(**extra: str) -> dict[str, str]:
            extra.pop("LEANSERVE_OPERATOR_RESYNC_SECONDS", None)
            return original(**extra)
        clusterlib.python_env = shipped  # type: ignore[assignment]
        try:
            super().__init__(kubeconfig, log)
        finally:
            clusterlib.python_env = original  # type: ignore[assignment]


def model(i: int) -> dict[str, Any]:
    return {"apiVersion": "leanserve.io/v1alpha1", "kind": "CompressedModel",
            "metadata": {"name": f"m{i:05d}", "namespace": NS},
            "spec": {"model": {"uri": "pvc://models/minilm"},
                     "data": {"uri": "pvc://models/data/sentences.jsonl"},
                     "compression": {"candidates": [{"name": "int8", "steps": [
                         {"quantize": {"method": "int8-dynamic"}}]}]},
                     "nodePools": [{"name": "cpu-small",
                                    "nodeSelector": {"leanserve.io/pool": "cpu-small"},
                                    "hourlyPrice": 0.1}],
                     "slo": {"latencyP95Ms": 50}}}


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.match(re.escape(name) + r"(\{| )", line))


def peak_rss_mib(pid: int) -> float:
    m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m[1]) / 1024 if m else float("nan")


def compressing(api: Api) -> tuple[int, int]:
    items = api.get(f"/apis/leanserve.io/v1alpha1/namespaces/{NS}/compressedmodels")["items"]
    jobs = api.get(f"/apis/batch/v1/namespaces/{NS}/jobs")["items"]
    return (sum((m.get("status") or {}).get("phase") == "Compressing" for m in items),
            len(jobs))


def finish_jobs(api: Api) -> int:
    """Every pending leanserve Job pod ends Succeeded with a finished run's termination message;
    returns how many were finished this call."""
    from leanserve.operator import handback

    report = {"metric": "cosine", "selected": "int8",
              "baseline": {"quality": 1.0, "throughput_rps": 100.0, "size_bytes": 90_000_000},
              "candidates": [{"name": "int8", "passed": True, "quality": 0.995,
                              "quality_drop": 0.005, "speedup": 2.0, "size_bytes": 23_000_000}]}
    profile = {"pools": {"cpu-small": {"capacity_rps": 50.0, "cost_per_million_requests": 0.56,
                                       "measured": True}}}
    pods = api.get(f"/api/v1/namespaces/{NS}/pods",
                   labelSelector="app.kubernetes.io/managed-by=leanserve,job-name")["items"]
    done = 0
    for pod in pods:
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        ctr = pod["spec"]["containers"][0]
        args = ctr.get("args", [])
        artifact = args[args.index("--artifact-uri") + 1]
        message = handback.encode(handback.summarize(report, artifact, "f" * 64, profile))
        t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        api.merge_patch(f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/status", {
            "status": {"phase": "Succeeded", "containerStatuses": [{
                "name": ctr["name"], "image": ctr.get("image", ""), "imageID": "",
                "ready": False, "restartCount": 0, "state": {"terminated": {
                    "exitCode": 0, "reason": "Completed", "message": message,
                    "startedAt": t, "finishedAt": t}}}]}})
        done += 1
    return done


def autoscaled(api: Api) -> int:
    """Models whose autoscaler has stepped (condition Autoscaling no longer Pending): its
    first decision and the condition it brings are written once, before the steady state."""
    items = api.get(f"/apis/leanserve.io/v1alpha1/namespaces/{NS}/compressedmodels")["items"]
    return sum(any(c.get("type") == "Autoscaling" and c.get("reason") != "Pending"
                   for c in (m.get("status") or {}).get("conditions") or []) for m in items)


def phases(api: Api) -> dict[str, int]:
    items = api.get(f"/apis/leanserve.io/v1alpha1/namespaces/{NS}/compressedmodels")["items"]
    out: dict[str, int] = {}
    for m in items:
        phase = (m.get("status") or {}).get("phase") or "-"
        out[phase] = out.get(phase, 0) + 1
    return out


def steady_state(op: OperatorProcess, n: int, seconds: float) -> tuple[float, float, float]:
    """(requests, writes, requests per model per minute) over ``seconds``."""
    r0 = metric(op.metrics_port, "leanserve_operator_api_requests")
    w0 = metric(op.metrics_port, "leanserve_operator_api_writes")
    time.sleep(seconds)
    r1 = metric(op.metrics_port, "leanserve_operator_api_requests")
    w1 = metric(op.metrics_port, "leanserve_operator_api_writes")
    return r1 - r0, w1 - w0, (r1 - r0) / n / (seconds / 60)


def run(n: int, steady: float, serving: bool = False) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="leanserve-bench-cluster-"))
    cp = ControlPlane(dir=tmp / "cp", kubeconfig=tmp / "cp" / "kubeconfig", bin=binaries_dir())
    cp.dir.mkdir()
    up = subprocess.run(["bash", str(SCRIPT), "up", str(cp.dir)], capture_output=True,
                        text=True, timeout=180)
    if up.returncode != 0:
        raise SystemExit(f"control-plane.sh up failed:\n{up.stderr}")
    try:
        install_crd(cp)
        install_operator(cp)
        cp.kubectl("create", "namespace", NS)
        (tmp / "store").mkdir()
        pv_and_claim(cp, NS, "models", tmp / "store")
        kubeconfig = service_account_kubeconfig(cp, tmp / "operator.kubeconfig")
        api = Api(cp.server, cp.dir / "pki")
        with Shipped(kubeconfig, tmp / "operator.log") as op:
            for _ in range(300):
                try:
                    metric(op.metrics_port, "leanserve_operator_reconciles_total")
                    break
                except OSError:
                    time.sleep(0.2)
            idle = peak_rss_mib(op.proc.pid)
            t0 = time.monotonic()
            for start in range(0, n, 500):  # kubectl create, 500 per call
                items = [model(i) for i in range(start, min(n, start + 500))]
                cp.kubectl("create", "-f", "-", timeout=600, input=json.dumps(
                    {"apiVersion": "v1", "kind": "List", "items": items}))
            created = time.monotonic() - t0
            done = jobs = 0
            while time.monotonic() - t0 < 1200:
                done, jobs = compressing(api)
                if done >= n and jobs >= n:
                    break
                time.sleep(2)
            t_all = time.monotonic() - t0
            requests0 = metric(op.metrics_port, "leanserve_operator_api_requests")
            writes0 = metric(op.metrics_port, "leanserve_operator_api_writes")
            time.sleep(steady)
            requests1 = metric(op.metrics_port, "leanserve_operator_api_requests")
            writes1 = metric(op.metrics_port, "leanserve_operator_api_writes")
            created_jobs = metric(op.metrics_port, "leanserve_operator_jobs_created_total")
            errors = metric(op.metrics_port, "leanserve_operator_errors_total")
            rss = peak_rss_mib(op.proc.pid)
            served: dict[str, Any] = {}
            if serving:
                t1 = time.monotonic()
                while time.monotonic() - t1 < 1200:
                    finish_jobs(api)
                    if phases(api).get("Serving", 0) >= n:
                        break
                    time.sleep(3)
                served["seconds"] = time.monotonic() - t1
                served["phases"] = phases(api)
                while time.monotonic() - t1 < 1500 and autoscaled(api) < n:
                    time.sleep(2)
                served["autoscaled"] = autoscaled(api)
                time.sleep(5)  # the reconciles the last status writes started
                served["steady"] = steady_state(op, n, steady)
                rss = peak_rss_mib(op.proc.pid)
            rbac = [ln for ln in op.forbidden() if " cannot " in ln]
        per_min = (requests1 - requests0) / n / (steady / 60)
        print("control plane                  kube-apiserver etc. from scripts/control-plane.sh")
        print(f"models created at once         {n} (kubectl create: {created:.1f} s)")
        print(f"models Compressing with a Job  {done} / {n}, Jobs {jobs} (created "
              f"{created_jobs:.0f}, errors {errors:.0f})")
        print(f"time until all reconciled      {t_all:.1f} s"
              + ("" if done >= n and jobs >= n else "  (TIMED OUT)")
              + f"  ({n / t_all:.1f} models/s; 5,000 in 10 min needs 8.3/s)")
        print(f"steady state, {steady:.0f} s         {requests1 - requests0:.0f} requests "
              f"({per_min:.3f} per model per minute; target <= 2), "
              f"{writes1 - writes0:.0f} writes")
        if serving:
            req, wr, pm = served["steady"]
            print(f"Jobs finished -> Serving       {served['seconds']:.1f} s, phases "
                  f"{served['phases']}, autoscaler stepped for {served['autoscaled']}")
            print(f"steady state Serving, {steady:.0f} s {req:.0f} requests ({pm:.3f} per model "
                  f"per minute; target <= 2), {wr:.0f} writes")
        print(f"operator peak RSS              {rss:.1f} MiB (idle {idle:.1f} MiB)")
        print(f"RBAC refusals                  {len(rbac)}")
        print(f"operator log                   {tmp / 'operator.log'}")
    finally:
        cp.down()


if __name__ == "__main__":
    import signal

    # SIGTERM (a timeout, a CI runner) unwinds like Ctrl-C, so the operator and the control
    # plane are stopped by the finally blocks instead of outliving the bench.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=int, default=500)
    p.add_argument("--steady", type=float, default=60.0)
    p.add_argument("--serving", action="store_true",
                   help="then finish every Job as a kubelet would and measure Serving models")
    a = p.parse_args()
    run(a.models, a.steady, a.serving)
