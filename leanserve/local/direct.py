"""Triton's metrics read straight from each replica, for machines without Prometheus.

It answers the same questions as the PromQL of leanserve.autoscaling.metrics (request rate,
p95, queue time) from two successive scrapes, with the same rule: no data is None, never zero.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import requests
from prometheus_client.parser import text_string_to_metric_families

from leanserve.autoscaling.metrics import Reading


class Endpoints(Protocol):
    def metrics_targets(self) -> list[tuple[str, str]]: ...


@dataclass
class _Sample:
    time: float
    success: float
    queue_us: float


def _http_text(url: str, timeout: float) -> str:
    return requests.get(url, timeout=timeout).text


@dataclass
class DirectSource:
    """Request rate, p95 and queue time from each replica's /metrics, between two reads.

    The rate of a reading is every completion between the previous reading and this one, over
    that span: a replica that became ready since the previous reading counts from zero (Triton's
    counters start with the process, and no request reaches a replica before it is ready), and
    a replica that stopped since counts what ``final_read`` took just before it stopped (the
    platform calls it; a replica that died unscraped loses its last completions, and the
    reading says so). Every problem has its kind (ERROR_KINDS), as PrometheusSource's do."""

    platform: Endpoints
    model: str
    clock: Callable[[], float]
    timeout: float = 2.0
    fetch: Callable[[str, float], str] = _http_text
    _last: dict[str, _Sample] = field(default_factory=dict)
    _last_read: float | None = None
    _gone: list[tuple[_Sample, _Sample]] = field(default_factory=list)
    """(sample of the previous reading, or zero; sample at its stop) of each replica that
    stopped since the previous reading."""
    _lost: list[str] = field(default_factory=list)
    _listed: set[str] = field(default_factory=set)
    """Targets listed at the previous reading (one that was, but could not be read, has no
    zero to count from)."""
    _span: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def window_seconds(self) -> float | None:
        """The span the last reading's rate averages over (the time since the reading before
        it); None until there is one."""
        return self._span

    def final_read(self, target: str) -> None:
        """Called just before a replica at ``target`` (host:port of its metrics) stops: keeps
        its completions since the previous reading for the next one."""
        try:
            text = self.fetch(f"http://{target}/metrics", self.timeout)
            success, queue_us, _p95 = self._parse(text)
        except (requests.RequestException, OSError, ValueError):
            success, queue_us = None, 0.0
        now = self.clock()
        with self._lock:
            before = self._last.pop(target, None)
            if self._last_read is None:
                return  # before the first reading: nothing was counted yet
            if before is None and target not in self._listed:
                before = _Sample(self._last_read, 0.0, 0.0)  # ready since the last reading
            if before is None or success is None:
                self._lost.append(f"{target}: stopped unread, its completions since the "
                                  "previous reading are left out")
                return
            self._gone.append((before, _Sample(now, success, queue_us)))

    def read(self) -> Reading:
        now = self.clock()
        problems: list[str] = []
        kinds: list[str] = []
        rate = queue_total = success_total = 0.0
        p95s: list[float] = []
        seen = 0
        pairs: list[tuple[_Sample, _Sample]] = []  # (from, to) of each replica counted
        with self._lock:
            previous, self._last_read = self._last_read, now
            listed_before, self._listed = self._listed, set()
            gone, self._gone = self._gone, []
            problems += self._lost
            kinds += ["unreachable"] * len(self._lost)
            self._lost = []
        listed = self.platform.metrics_targets()
        with self._lock:
            self._listed = {t for _p, t in listed}
        for _pool, target in listed:
            try:
                text = self.fetch(f"http://{target}/metrics", self.timeout)
            except (requests.RequestException, OSError) as exc:
                problems.append(f"{target}: {type(exc).__name__}")
                kinds.append("unreachable")
                continue
            try:
                success, queue_us, p95 = self._parse(text)
            except ValueError as exc:
                problems.append(f"{target}: malformed metrics ({exc})")
                kinds.append("malformed")
                continue
            if success is None:
                problems.append(f"{target}: no nv_inference_request_success for {self.model}")
                kinds.append("empty")
                continue
            sample = _Sample(now, success, queue_us)
            with self._lock:
                before = self._last.get(target)
                self._last[target] = sample
            if p95 is not None and math.isfinite(p95):
                p95s.append(p95 / 1000)
            if before is None:
                if previous is None or target in listed_before:
                    continue  # the first reading, or unread last time: no start to count from
                before = _Sample(previous, 0.0, 0.0)  # ready since the last reading: from 0
            pairs.append((before, sample))
        pairs += gone  # stopped since: their completions until they stopped
        for before, last in pairs:
            if now <= before.time:
                continue
            seen += 1
            d_success = max(0.0, last.success - before.success)
            rate += d_success / (now - before.time)
            success_total += d_success
            queue_total += max(0.0, last.queue_us - before.queue_us)
        with self._lock:  # a replica no longer listed is gone: its address may come back reused
            for target in [t for t in self._last if t not in self._listed]:
                del self._last[target]
        p95_ms = max(p95s) if p95s else None
        if seen == 0:
            problems.append("request rate: no replica read twice yet" if previous is None
                            else "request rate: no replica could be read")
            kinds.append("empty")
            self._span = None
            return Reading(None, p95_ms, None, {}, problems, kinds)
        self._span = now - previous if previous is not None else None
        queue_ms = queue_total / success_total / 1000 if success_total else None
        return Reading(rate, p95_ms, queue_ms, {}, problems, kinds)

    def _parse(self, text: str) -> tuple[float | None, float, float | None]:
        """(requests completed: answered or failed, queue time in us, p95 in us). A failed
        request counts: one Triton rejected (a queue timeout) was load all the same, as the
        cluster's request-rate query has it."""
        success: float | None = None
        failed = 0.0
        queue = 0.0
        p95: float | None = None
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("model") != self.model:
                    continue
                # the parser names counter samples <family>_total; Triton's carry no suffix
                name = s.name.removesuffix("_total")
                if name == "nv_inference_request_success":
                    success = (success or 0.0) + s.value
                elif name == "nv_inference_request_failure":
                    failed += s.value
                elif name == "nv_inference_queue_duration_us":
                    queue += s.value
                elif s.name == "nv_inference_request_summary_us" and \
                        s.labels.get("quantile") == "0.95":
                    p95 = s.value if p95 is None else max(p95, s.value)
        return (None if success is None else success + failed), queue, p95
