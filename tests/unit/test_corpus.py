"""examples/data/real_corpus.jsonl is real, varied, training-only text from the allowed sources."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "examples/data/real_corpus.jsonl"


def test_rows_are_training_only_prose_from_the_allowed_sets() -> None:
    import sys

    sys.path.insert(0, str(CORPUS.parent))
    try:
        from make_real_corpus import FORTUNE_SETS
    finally:
        sys.path.pop(0)
    rows = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    assert len(rows) == 40000
    allowed = {f"fortunes/{name}" for name in FORTUNE_SETS} | {"python-docstrings"}
    wordnet = {"wordnet/example", "wordnet/definition"}
    for i, row in enumerate(rows):
        assert row["split"] == "train"
        # the first 20,000 rows are the fortunes and docstrings, then 10,000 of each WordNet kind
        assert row["source"] in (allowed if i < 20000 else wordnet)
        assert (5 if i < 20000 else 4) <= len(row["text"].split()) <= 60
    assert sum(r["source"] == "wordnet/example" for r in rows) == 10000
    assert len({r["text"].lower() for r in rows}) == len(rows)
    words = {w.lower().strip(".,;:!?\"'()") for r in rows for w in r["text"].split()}
    assert len(words) > 30000  # the template corpus had 713
    held = {w.lower().strip(".,;:!?\"'()") for line in
            (CORPUS.parent / "sentences.jsonl").read_text().splitlines()
            for w in json.loads(line)["text"].split()}
    assert len(held & words) > 0.8 * len(held)  # fortunes and docstrings alone: 76%


def test_no_held_out_sentence_is_in_the_training_corpus() -> None:
    held = {json.loads(line)["text"].lower()
            for line in (CORPUS.parent / "sentences.jsonl").read_text().splitlines()}
    assert not held & {json.loads(line)["text"].lower()
                       for line in CORPUS.read_text().splitlines()}


def test_minilm_data_holds_out_only_hand_written_sentences_and_trains_on_the_corpus() -> None:
    from leanserve.api.spec import Task
    from leanserve.compression.loading import load_data, split3

    data = CORPUS.parent / "minilm.jsonl"
    sentences = [json.loads(line)["text"]
                 for line in (CORPUS.parent / "sentences.jsonl").read_text().splitlines()]
    corpus = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    rows = load_data(str(data), Task.FEATURE_EXTRACTION, None)
    assert rows.texts == sentences + corpus  # make_corpus.py's output is current
    train, val, test = split3(rows, 0.25, seed=0)  # examples/minilm-cpu.yaml's split
    assert len(val) == len(test) == 50 and len(train) == 300 + len(corpus)
    assert set(val.texts) | set(test.texts) <= set(sentences)
    assert not (set(val.texts) | set(test.texts)) & set(train.texts)
