"""Quality on text nobody chose: every candidate of a compression run against its fp32 baseline,
on sentences from this machine's Debian system that no spec, split or setting has seen.

    python bench/unseen_text.py [RUN_DIR] [--texts FILE.jsonl] [--rows 400] [--out FILE]

RUN_DIR is a `leanserve compress` output directory or a `leanserve run` one (default
leanserve-run, whose compression/ holds baseline/model.onnx and artifacts/<candidate>/model.onnx).
The tokenizer and maxSequenceLength are the spec's (``--spec``, default examples/minilm-cpu.yaml:
give the spec the run compressed).

Where the text comes from (``--texts`` replaces both with the "text" of each row of a JSONL file):
- Debian package synopses (``apt-cache dumpavail``'s Description lines): short noun phrases;
- README prose (``/usr/share/doc/*/README*``): sentences of 40-300 characters that start like a
  sentence and hold no markup or shell characters.

Neither is committed (each file keeps its own package's licence); the rows are drawn with a fixed
seed from what this machine has, so two machines with other packages print other rows. The
project's corpus (examples/data) is fortunes, CPython docstrings and WordNet: none of this.

Why: the gate reads the spec's validation split, text of the kind the user supplied. This shows
how each candidate's agreement with the baseline holds on other kinds of text (mean, 5th
percentile and worst row cosine), i.e. how much of a gate's margin is the validation split's.
Measured on the default spec's `leanserve run` output (2 threads), with validation and test of
200 rows each (50 hand-written sentences and 150 held-out rows of the real corpus,
examples/data/CORPUS.md):

    text                 int8     pruned-int8  qat-int8  int4     distilled-int8  low-rank
    validation (gates)   0.9947   0.9899       0.9942    0.9664   0.9356          0.7202
    test split           0.9944   0.9896       0.9940    0.9663   0.9369          0.7214
    Debian synopses      0.9947   0.9884       0.9945    0.9722   0.9348          0.7257
    README prose         0.9938   0.9880       0.9932    0.9648   0.9001          0.6833

When validation was the 50 hand-written sentences alone (int8 0.9962, pruned-int8 0.9914, qat-int8
0.9956), pruned-int8 passed the gate (drop 0.0086) and fell to 0.9885 and 0.9881 here; the three
int8 candidates' validation figures were 0.0013-0.0033 above this text. With the real rows they
are at most 0.0019 above it, and pruned-int8 fails the gate (drop 0.0101). A gate is only as good
as the likeness of its validation rows to the traffic.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
MARKUP = re.compile(r"[{}<>=$#|\\`*_\[\]]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str, lo: int = 40, hi: int = 300) -> list[str]:
    """Prose sentences of ``text``: split after . ! or ?, whitespace collapsed, kept when
    lo..hi characters long, starting with a capital then a lower-case letter, and free of
    markup or shell characters (tables, code, URLs' query strings, ASCII art)."""
    out = []
    for s in SENTENCE_END.split(re.sub(r"\s+", " ", text)):
        s = s.strip()
        if lo <= len(s) <= hi and re.match(r"^[A-Z][a-z]", s) and not MARKUP.search(s) \
                and "://" not in s:
            out.append(s)
    return out


def debian_synopses() -> list[str]:
    """The one-line Description of every package apt knows (empty without apt)."""
    try:
        out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True,
                             check=False, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.split(":", 1)[1].strip() for line in out.splitlines()
                   if line.startswith("Description:")} - {""})


def readme_prose(doc: Path = Path("/usr/share/doc")) -> list[str]:
    """Prose sentences of every package's README (plain or gzipped)."""
    found: set[str] = set()
    for p in sorted(doc.glob("*/README*")):
        try:
            if p.suffix == ".gz":
                with gzip.open(p, "rt", errors="ignore") as f:
                    raw = f.read()
            else:
                raw = p.read_text(errors="ignore")
        except (OSError, EOFError, UnicodeError):
            continue
        found.update(sentences(raw))
    return sorted(found)


def draw(texts: list[str], rows: int) -> list[str]:
    return random.Random(SEED).sample(texts, min(rows, len(texts)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", type=Path, default=ROOT / "leanserve-run")
    ap.add_argument("--spec", type=Path, help="default: the spec the run's report names")
    ap.add_argument("--texts", type=Path, help="JSONL with a 'text' per row, instead of Debian's")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--out", type=Path, help="write the figures as JSON")
    args = ap.parse_args(argv)

    from leanserve.api.load import load_one
    from leanserve.api.spec import QualityMetric
    from leanserve.compression.evaluate import summary
    from leanserve.compression.export import run_onnx, session
    from leanserve.compression.loading import Rows, batches, load_model

    comp = args.run_dir / "compression" if (args.run_dir / "compression").is_dir() \
        else args.run_dir
    baseline = comp / "baseline" / "model.onnx"
    arts = sorted(p.parent for p in (comp / "artifacts").glob("*/model.onnx"))
    if not baseline.is_file() or not arts:
        print(f"error: {comp}: no baseline/model.onnx or artifacts/*/model.onnx; give the "
              "output directory of `leanserve run` or `leanserve compress`", file=sys.stderr)
        return 2
    spec_path = args.spec or ROOT / "examples/minilm-cpu.yaml"
    loaded = load_one(spec_path)
    spec = loaded.spec
    tokenizer = load_model(spec.model.uri, spec.model.format, spec.model.task,
                           loaded.base_dir).tokenizer
    if args.texts:
        rows = [json.loads(line)["text"] for line in args.texts.read_text().splitlines()
                if line.strip()]
        sets = {args.texts.name: draw(rows, args.rows)}
    else:
        sets = {"Debian synopses": draw(debian_synopses(), args.rows),
                "README prose": draw(readme_prose(), args.rows)}
    sets = {k: v for k, v in sets.items() if v}
    if not sets:
        print("error: no text found (no apt-cache, no /usr/share/doc READMEs): give --texts",
              file=sys.stderr)
        return 2
    base = session(baseline)
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for label, texts in sets.items():
        parts = batches(Rows(texts=texts), tokenizer=tokenizer,
                        max_length=spec.model.max_sequence_length, batch_size=32)
        ref = np.concatenate([run_onnx(base, b) for b in parts])
        result[label] = {}
        for art in arts:
            sess = session(art / "model.onnx")
            out = np.concatenate([run_onnx(sess, b) for b in parts])
            result[label][art.name] = summary(QualityMetric.COSINE, out, ref, None)
        print(f"{label} ({len(texts)} rows; cosine to the fp32 baseline: mean / p5 / worst)")
        for name, s in result[label].items():
            print(f"  {name:20s} {s['mean']:.4f} / {s['p5']:.4f} / {s['worst']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
