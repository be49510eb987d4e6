"""bench/unseen_text.py: the prose filter keeps sentences and drops markup, code and fragments."""

from __future__ import annotations

from scripts_by_path import load_script


def _bench():
    return load_script("bench/unseen_text.py")


def test_sentences_keeps_prose_and_drops_markup_code_and_fragments() -> None:
    text = """This package provides the   command line tools for the archive.  See below.
    Run ./configure --prefix=$HOME then make.  <b>Bold claims</b> are made in HTML here too.
    Documentation is at https://example.org/docs for those who look carefully.
    | Table | cell | with pipes in it for a long enough line of text |.
    The library is thread-safe; every call may come from any thread at any time!"""
    got = _bench().sentences(text)
    assert got == ["This package provides the command line tools for the archive.",
                   "The library is thread-safe; every call may come from any thread at any "
                   "time!"]


def test_draw_is_fixed_by_the_seed_and_never_repeats_a_row() -> None:
    mod = _bench()
    rows = [f"row {i}" for i in range(100)]
    a, b = mod.draw(rows, 30), mod.draw(list(rows), 30)
    assert a == b and len(set(a)) == 30 and set(a) <= set(rows)
    assert sorted(mod.draw(rows, 500)) == sorted(rows)

