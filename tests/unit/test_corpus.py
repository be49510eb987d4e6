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


def test_minilm_data_holds_out_hand_written_and_real_rows_and_trains_on_the_rest() -> None:
    import sys

    from leanserve.api.spec import Task
    from leanserve.compression.loading import _norm, load_data, split3

    sys.path.insert(0, str(CORPUS.parent))
    try:
        from make_corpus import KINDS, held_out
    finally:
        sys.path.pop(0)
    data = CORPUS.parent / "minilm.jsonl"
    sentences = [json.loads(line)["text"]
                 for line in (CORPUS.parent / "sentences.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in CORPUS.read_text().splitlines()]
    marked = held_out(corpus)
    rows = load_data(str(data), Task.FEATURE_EXTRACTION, None)
    assert rows.texts == sentences + [r["text"] for r in corpus]
    assert rows.marks is not None  # make_corpus.py's output is current
    assert list(rows.marks) == [""] * len(sentences) + [marked.get(i, "train")
                                                        for i in range(len(corpus))]
    train, val, test = split3(rows, 0.25, seed=0)  # examples/minilm-cpu.yaml's split
    assert len(val) == len(test) == 50 + 150 and len(train) == 300 + len(corpus) - 300
    for part, name in ((val, "validation"), (test, "test")):
        assert part.texts is not None
        assert len(set(part.texts) & set(sentences)) == 50
        sources = [corpus[i]["source"] for i, where in marked.items() if where == name]
        for prefixes in KINDS.values():  # a third of the real rows from each kind
            assert sum(s.startswith(prefixes) for s in sources) == 50
    assert train.texts is not None and val.texts is not None and test.texts is not None
    assert not {_norm(t) for t in val.texts + test.texts} & {_norm(t) for t in train.texts}
    # the sample is fixed (SEED), not drawn afresh
    assert held_out(corpus) == marked and held_out(corpus, seed=1) != marked
