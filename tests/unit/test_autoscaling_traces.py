"""The committed load traces are what the project's generator writes (bench/make_traces.py), and
the held-out set is another draw of every shape, not a copy of the tuning set (issue 15)."""

from __future__ import annotations

from pathlib import Path

from scripts_by_path import ROOT, load_script

from leanserve.autoscaling.simulate import load_trace


def _generator():
    return load_script("bench/make_traces.py")


def test_committed_traces_are_the_generators_and_held_out_is_another_draw(tmp_path: Path):
    gen = _generator()
    for which, folder in ((gen.TUNING, "traces"), (gen.HELDOUT, "traces-heldout")):
        written = gen.write(tmp_path / folder, which)
        committed = sorted(p.name for p in (ROOT / "bench" / folder).glob("*.csv"))
        assert sorted(p.name for p in written) == committed
        for p in written:
            assert p.read_bytes() == (ROOT / "bench" / folder / p.name).read_bytes(), \
                f"bench/{folder}/{p.name} is not what bench/make_traces.py writes"
    for p in (tmp_path / "traces").glob("*.csv"):
        tune, held = load_trace(p), load_trace(tmp_path / "traces-heldout" / p.name)
        assert tune.times == held.times  # the same span and resolution ...
        assert tune.rates != held.rates  # ... another draw
    # the multi-day shapes span days (daily and weekly seasonality), the short ones two hours
    assert load_trace(tmp_path / "traces-heldout/week.csv").duration >= 7 * 86400
    assert load_trace(tmp_path / "traces-heldout/quiet.csv").duration >= 4 * 86400
