"""Writes examples/data/minilm.jsonl: sentences.jsonl followed by real_corpus.jsonl.

examples/minilm-cpu.yaml (and, on a claim, minilm-cluster.yaml) reads minilm.jsonl.

Why: an embedding student (distillation) or a pruned model (fine-tuning) learns from its
teacher's outputs on any text, and 300 training sentences are far too few for it to generalise
to held-out ones. real_corpus.jsonl holds 20,000 real English sentences (make_real_corpus.py;
sources and licences in CORPUS.md), every one marked ``"split": "train"``: the pipeline trains
and calibrates on them and never holds one out. (The template sentences this file used to hold
covered 31% of the held-out vocabulary in 713 word types; a student trained on them failed the
gate on real sentences.)

The file starts with sentences.jsonl's rows unchanged and in order, so the validation and test
rows are exactly the ones a spec on sentences.jsonl holds out; the loader also drops any
training-only row whose text is a held-out one (there is none: tests/unit/test_corpus.py).

    python examples/data/make_corpus.py

Deterministic; no network.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "sentences.jsonl"
TRAINING = HERE / "real_corpus.jsonl"
OUT = HERE / "minilm.jsonl"


def main() -> int:
    held = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    extra = [json.loads(line) for line in TRAINING.read_text().splitlines() if line.strip()]
    if any(row.get("split") != "train" for row in extra):
        raise SystemExit(f"{TRAINING}: every row must carry \"split\": \"train\"")
    with OUT.open("w", encoding="utf-8") as out:
        for row in held + [{"text": r["text"], "split": "train"} for r in extra]:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(held)} rows of {SOURCE.name} + {len(extra)} training-only rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
