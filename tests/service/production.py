"""Helpers for the production tests: a bounded load client and metrics parsing."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.service.support import N_FEATURES

BODY = {"features": [0.5] * N_FEATURES}


@dataclass
class Load:
    """Threads POSTing /predict on fresh connections until stopped (at most `limit` each)."""

    url: str
    threads: int = 2
    limit: int = 20000
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        for _ in range(self.limit):
            if self._stop.is_set():
                return
            try:
                r = requests.post(self.url + "/predict", json=BODY, timeout=10)
                outcome = None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
            except requests.RequestException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with self._lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append(outcome)

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for t in self._workers:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=30)


def metrics(url: str, headers: dict[str, str] | None = None) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} from /metrics, parsed by prometheus_client."""
    text = requests.get(url + "/metrics", headers=headers, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(values: dict[tuple, float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
