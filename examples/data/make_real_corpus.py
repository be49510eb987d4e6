"""Writes examples/data/real_corpus.jsonl: real English sentences, available offline.

Why: distillation and pruning fine-tunes learn the teacher's embeddings from text; the
template-generated rows of make_corpus.py cover a few hundred word types, so a student trained
on them fails on real sentences. This corpus is written by people, from two sources that any
Debian machine with Python 3.11 has (no network at run time, no hub):

- the BSD fortune databases of Debian's ``fortunes`` package (``apt-get install fortunes``;
  BSD licence, see /usr/share/doc/fortunes/copyright). Only the sets listed in FORTUNE_SETS are
  read: the offensive sets live in a separate package (``fortunes-off``) that is never read, and
  sets of jokes about groups of people, drugs or sex, ASCII art and chat logs are left out too;
- the docstrings of CPython 3.11's standard library (Python Software Foundation License),
  parsed with ``ast`` from the interpreter's own source files: prose sentences only (no code,
  no doctest lines);
- WordNet 3.0 (Debian's ``wordnet-base``, ``apt-get install wordnet-base``; WordNet 3.0
  licence, Princeton University, see /usr/share/doc/wordnet-base/copyright): the usage examples
  of its synsets ("he scored twice in the final minutes") and their definitions, every field of
  everyday English (sports, cooking, travel, money, health, science, films); with
  ``--wordnet 0`` it is left out. Phrases of 4 to 60 words.

Each row is ``{"text", "source", "split": "train"}``: training and calibration text only, so a
spec's held-out rows never come from it. Sentences of 5 to 60 words (WordNet's: 4 to 60),
deduplicated, in a seeded random order: the fortunes and docstrings first (up to
``--max-rows``), then up to ``--wordnet`` WordNet rows, half examples and half definitions.

    python examples/data/make_real_corpus.py [--max-rows 20000] [--wordnet 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "real_corpus.jsonl"
FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
WORDNET_POS = ("noun", "verb", "adj", "adv")
QUOTED = re.compile(r'"([^"]+)"')
FORTUNE_SETS = (
    "art", "computers", "cookie", "definitions", "education", "food", "fortunes", "goedel",
    "humorists", "kids", "law", "literature", "love", "magic", "medicine", "miscellaneous",
    "news", "people", "pets", "platitudes", "politics", "riddles", "science", "songs-poems",
    "sports", "wisdom", "work",
)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
# What prose does not contain: code, markup, tables, attributions, URLs.
NOT_PROSE = re.compile(r"[{}<>=_`|\\#@*~^$]|\(\)|>>>|\.\.\.\s*$|https?:|--|\s{2,}|\bQ:|\bA:")


def sentences(text: str) -> Iterator[str]:
    flat = " ".join(text.split())
    for part in SENTENCE_END.split(flat):
        words = part.split()
        if 5 <= len(words) <= 60 and part[0].isupper() and part[-1] in ".!?" \
                and not NOT_PROSE.search(part) and sum(c.isalpha() for c in part) > 0.7 * len(part):
            yield part


def fortunes() -> Iterator[tuple[str, str]]:
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} is missing: apt-get install fortunes")
    for name in FORTUNE_SETS:
        path = FORTUNES / name
        if not path.exists():
            continue
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            # drop attribution lines ("-- Mark Twain") and indented verse/dialogue layout
            body = "\n".join(line for line in entry.splitlines()
                             if not line.strip().startswith("--"))
            for sentence in sentences(body):
                yield sentence, f"fortunes/{name}"


def docstrings() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_path("stdlib"))
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in ("test", "idlelib", "lib2to3", "site-packages", "tkinter") or \
                "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                for paragraph in doc.split("\n\n"):
                    if paragraph.lstrip().startswith((">>>", "-", "*", ":")):
                        continue
                    for sentence in sentences(paragraph):
                        yield sentence, "python-docstrings"


def wordnet() -> tuple[list[str], list[str]]:
    """WordNet's usage examples and definitions, in file order (each synset line of data.POS
    ends in ``| definition; "example"; "example"``)."""
    if not WORDNET.is_dir():
        raise SystemExit(f"{WORDNET} is missing: apt-get install wordnet-base (or --wordnet 0)")
    examples: list[str] = []
    definitions: list[str] = []
    for pos in WORDNET_POS:
        for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith(" ") or "|" not in line:  # the licence header
                continue
            gloss = line.split("|", 1)[1].strip()
            definition = gloss.split('"')[0].strip().rstrip(";").strip()
            for text, out in [(definition, definitions),
                              *((q.strip(), examples) for q in QUOTED.findall(gloss))]:
                if 4 <= len(text.split()) <= 60 and not NOT_PROSE.search(text):
                    out.append(text)
    return examples, definitions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-rows", type=int, default=20000)
    ap.add_argument("--wordnet", type=int, default=20000,
                    help="WordNet rows after the others (half examples, half definitions)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for text, source in [*fortunes(), *docstrings()]:
        key = text.lower()
        if key not in seen:
            seen.add(key)
            rows.append({"text": text, "source": source, "split": "train"})
    random.Random(args.seed).shuffle(rows)
    rows = rows[:args.max_rows]
    if args.wordnet:
        rng = random.Random(args.seed + 1)
        picked: list[tuple[str, str]] = []
        for kind, texts in zip(("wordnet/example", "wordnet/definition"), wordnet(),
                               strict=True):
            fresh = [t for t in dict.fromkeys(texts) if t.lower() not in seen]
            picked += [(t, kind) for t in rng.sample(fresh, min(len(fresh), args.wordnet // 2))]
        rng.shuffle(picked)
        for text, kind in picked:
            if text.lower() not in seen:
                seen.add(text.lower())
                rows.append({"text": text, "source": kind, "split": "train"})
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    by_source: dict[str, int] = {}
    for row in rows:
        kind = row["source"].split("/")[0]
        by_source[kind] = by_source.get(kind, 0) + 1
    words = {w.lower().strip(".,;:!?\"'()") for r in rows for w in r["text"].split()}
    print(f"wrote {len(rows)} rows to {OUT} ({by_source}); {len(words)} word types")


if __name__ == "__main__":
    main()
