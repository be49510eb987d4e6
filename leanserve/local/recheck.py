"""Are the compression timings trustworthy? A recheck for machines shared with other work.

The compression step times the baseline first and every candidate minutes later; on a machine
where other jobs come and go, one slow baseline turns into a large "speed-up" for everything
timed after it (a trial measured the baseline at 64 rows/s instead of 295 and claimed 5-7x).
So `leanserve run` times the baseline and the selected candidate again, interleaved, a few
rounds: a paired ratio per round is insensitive to slow drifts of the machine's speed, the
spread between rounds shows interference, and the baseline's new figure against its earlier
one shows whether the first measurement was disturbed. The selection is not redone (the
artifacts are written); the report warns and quotes the rechecked speed-up instead.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPREAD_LIMIT = 0.15
"""(max - min) / median of repeated throughput figures above which timings count as noisy."""
DRIFT_LIMIT = 0.25
"""Baseline's rechecked throughput this far (relative) from its earlier figure: noisy."""


@dataclass(frozen=True)
class Judgement:
    noisy: bool
    notes: list[str]
    speedup: float | None
    spread: float


def judge(earlier_baseline_rps: float | None, earlier_speedup: float | None,
          rounds: list[tuple[float, float]]) -> Judgement:
    """Pure: ``rounds`` are (baseline rows/s, selected rows/s) measured back to back."""
    notes: list[str] = []
    base = [b for b, _s in rounds]
    sel = [s for _b, s in rounds]
    ratios = [s / b for b, s in rounds if b > 0]
    spread = max(_spread(base), _spread(sel)) if rounds else 0.0
    if spread > SPREAD_LIMIT:
        notes.append(f"repeated timings differ by {spread:.0%}")
    base_now = statistics.median(base) if base else None
    if earlier_baseline_rps and base_now:
        drift = base_now / earlier_baseline_rps - 1
        if abs(drift) > DRIFT_LIMIT:
            notes.append(f"the baseline ran at {base_now:.0f} rows/s now against "
                         f"{earlier_baseline_rps:.0f} rows/s when first timed")
    speedup = statistics.median(ratios) if ratios else None
    if speedup and earlier_speedup and abs(earlier_speedup / speedup - 1) > DRIFT_LIMIT:
        notes.append(f"the first timing claimed {earlier_speedup:.2f}x, the interleaved "
                     f"recheck {speedup:.2f}x")
    return Judgement(bool(notes), notes, speedup, spread)


def _spread(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    med = statistics.median(xs)
    return (max(xs) - min(xs)) / med if med > 0 else 0.0


def recheck(loaded: Any, compression_dir: Path, comp: dict[str, Any], *, rounds: int = 3,
            note: Callable[[str], None] = lambda _s: None) -> dict[str, Any]:
    """Time the baseline and the selected candidate ``rounds`` times, interleaved."""
    from leanserve.compression.benchmark import BenchSettings, benchmark
    from leanserve.compression.loading import batches, load_data, split
    from leanserve.compression.pipeline import Settings

    sel = next(c for c in comp["candidates"] if c["name"] == comp["selected"])
    spec = loaded.spec
    s = Settings()
    rows = load_data(spec.data.uri, spec.model.task, loaded.base_dir)
    _train, held_rows = split(rows, spec.data.eval_fraction, s.seed)
    tok_dir = compression_dir / comp["baseline"]["artifact"].rsplit("/", 1)[0] / "tokenizer"
    tokenizer = None
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    held = batches(held_rows, tokenizer=tokenizer, max_length=spec.model.max_sequence_length,
                   batch_size=s.batch_size)
    bench = BenchSettings(iterations_b1=5, iterations_bn=s.bench.iterations_bn)
    base_path = compression_dir / comp["baseline"]["artifact"]
    sel_path = compression_dir / sel["artifact"]
    measured: list[tuple[float, float]] = []
    for i in range(rounds):
        b = benchmark(base_path, held, bench).throughput_rps
        c = benchmark(sel_path, held, bench).throughput_rps
        measured.append((b, c))
        note(f"recheck {i + 1}/{rounds}: baseline {b:.0f} rows/s, {sel['name']} {c:.0f} rows/s")
    j = judge(comp["baseline"].get("throughput_rps"), sel.get("speedup"), measured)
    return {"rounds": [{"baseline_rps": b, "selected_rps": c} for b, c in measured],
            "speedup": j.speedup, "spread": j.spread, "noisy": j.noisy, "notes": j.notes}
