"""The compression Job's entry point: run `leanserve compress`, hand the result back.

``python -m leanserve.operator.jobrunner --artifact-uri URI [--upload-to s3://..] [--profile]
-- leanserve compress /spec/spec.yaml --out DIR`` runs the command after ``--`` (hard timeout,
always reaped), then writes the report summary (``handback``) to the termination message so the
operator never has to mount the store. On failure it writes the last log lines there instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from leanserve.operator import handback
from leanserve.operator.builders import GPU_REPOSITORY_SUFFIX
from leanserve.operator.constants import TERMINATION_LOG
from leanserve.serving.repository import to_gpu_repository

TIMEOUT_SECONDS = float(os.environ.get("LEANSERVE_JOB_TIMEOUT_SECONDS", 6 * 3600))


def run(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run argv, echoing its output, and return (exit code, all output)."""
    out: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                out.append(line)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            out.append(f"\n{argv[0]} killed after {timeout:g}s\n")
            return 124, "".join(out)
    return proc.returncode, "".join(out)


def model_sha256(out: Path, selected: str | None) -> str:
    """sha256 of the selected candidate's ONNX file (or of the whole repository, in order)."""
    h = hashlib.sha256()
    onnx = out / "artifacts" / str(selected) / "model.onnx"
    files = [onnx] if onnx.is_file() else sorted(
        p for p in (out / "model_repository").rglob("*") if p.is_file())
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def upload(out: Path, target: str) -> None:
    """Copy DIR to s3://BUCKET/PATH with the credentials from the environment."""
    import boto3

    bucket, _, prefix = target.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        s3.upload_file(str(f), bucket, f"{prefix.rstrip('/')}/{f.relative_to(out)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: jobrunner [options] -- leanserve compress SPEC --out DIR", file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="leanserve.operator.jobrunner")
    p.add_argument("--artifact-uri", required=True)
    p.add_argument("--upload-to", default="")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--gpu-repository", action="store_true",
                   help="also write the KIND_GPU repository beside model_repository")
    p.add_argument("--termination-log", default=TERMINATION_LOG)
    opts = p.parse_args(argv[:split])
    command = argv[split + 1:]
    out = Path(command[command.index("--out") + 1])
    spec = command[2] if len(command) > 2 else ""
    log = Path(opts.termination_log)

    code, output = run(command, TIMEOUT_SECONDS)
    if code != 0:
        log.write_text(handback.tail(output))
        return code
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    gpu = bool(opts.gpu_repository and report.get("selected"))
    if gpu:
        # copied before the profile rewrites the CPU repository's config: the profile measures
        # this CPU, and a GPU pool keeps the spec's batching (its capacity is derived)
        to_gpu_repository(out / "model_repository",
                          out / ("model_repository" + GPU_REPOSITORY_SUFFIX))
    profile = None
    if opts.profile and report.get("selected"):
        pcode, poutput = run(["leanserve", "profile", str(out / "model_repository"), "--spec",
                              spec, "--out", str(out / "profile.json"), "--quick",
                              "--apply"],
                             TIMEOUT_SECONDS)
        if pcode == 0 and (out / "profile.json").is_file():
            profile = json.loads((out / "profile.json").read_text())
        else:
            print(handback.tail(poutput, lines=5), file=sys.stderr)
    sha = model_sha256(out, report.get("selected")) if report.get("selected") else ""
    if opts.upload_to:
        upload(out, opts.upload_to)
    log.write_text(handback.encode(handback.summarize(report, opts.artifact_uri, sha, profile,
                                                      gpu=gpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
