"""Triton's metrics read straight from each replica, for machines without Prometheus.

It answers the same questions as the PromQL of leanserve.autoscaling.metrics (request rate,
p95, queue time) from two successive scrapes, with the same rule: no data is None, never zero.
"""

from __future__ import annotations

import math
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
    platform: Endpoints
    model: str
    clock: Callable[[], float]
    timeout: float = 2.0
    fetch: Callable[[str, float], str] = _http_text
    _last: dict[str, _Sample] = field(default_factory=dict)

    def read(self) -> Reading:
        now = self.clock()
        problems: list[str] = []
        rate = queue_total = success_total = 0.0
        p95s: list[float] = []
        seen = 0
        for _pool, target in self.platform.metrics_targets():
            try:
                text = self.fetch(f"http://{target}/metrics", self.timeout)
            except (requests.RequestException, OSError) as exc:
                problems.append(f"{target}: {type(exc).__name__}")
                continue
            success, queue_us, p95 = self._parse(text)
            if success is None:
                problems.append(f"{target}: no nv_inference_request_success for {self.model}")
                continue
            before = self._last.get(target)
            self._last[target] = _Sample(now, success, queue_us)
            if p95 is not None and math.isfinite(p95):
                p95s.append(p95 / 1000)
            if before is None or now <= before.time:
                continue  # a new replica: its rate needs a second scrape
            seen += 1
            d_success = max(0.0, success - before.success)
            rate += d_success / (now - before.time)
            success_total += d_success
            queue_total += max(0.0, queue_us - before.queue_us)
        if seen == 0:
            problems.append("no replica scraped twice yet")
            return Reading(None, max(p95s) if p95s else None, None, {}, problems)
        queue_ms = queue_total / success_total / 1000 if success_total else None
        return Reading(rate, max(p95s) if p95s else None, queue_ms, {}, problems)

    def _parse(self, text: str) -> tuple[float | None, float, float | None]:
        success: float | None = None
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
                elif name == "nv_inference_queue_duration_us":
                    queue += s.value
                elif s.name == "nv_inference_request_summary_us" and \
                        s.labels.get("quantile") == "0.95":
                    p95 = s.value if p95 is None else max(p95, s.value)
        return success, queue, p95
