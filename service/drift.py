"""Input drift over time: each model's recent inputs against its training deciles.

Every request's numeric inputs are binned by the training deciles (`bnserve.profile`: 10 bins of
10% each in training), in one broadcast comparison, and the counts are added to a window shared
by all workers: a small file per model version of `SLOTS` time slots x inputs x 10 bins (memory
mapped; a worker adds its counts under a file lock at most once a second). The window is the
last `--drift-window-secs` (default 600 s). The population stability index of each input,
PSI = sum over bins of (actual - expected) x ln(actual / expected), with the expected share 0.1
per bin, is exported as the gauge `bnserve_drift_psi{model,input}` and answered by
`GET /models/{m}/drift` (inputs above 0.2, the usual "significant shift" threshold, first).
Without a runtime directory (a test client) the window lives in the process.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bnserve.service.profile import Profile, numbers_of

SLOTS = 10  # the window in slots: its oldest tenth leaves at a time
BINS = 10  # the training deciles cut every input into ten bins of 10%
SIGNIFICANT = 0.2  # PSI above this: a significant shift (the customary threshold)
FLUSH_SECONDS = 1.0
MAX_BUFFERED = 8192  # rows kept unbinned at most between two flushes
_SMOOTH = 1e-4  # an empty bin counts as this share, so ln() stays finite


def bin_counts(values: np.ndarray, deciles: np.ndarray) -> np.ndarray:
    """`[F, BINS]` counts of `values` `[n, F]` by each input's training deciles (NaN skipped)."""
    features = values.shape[1]
    bins = (values[:, :, None] > deciles[None, :, :]).sum(axis=2)  # [n, F] in 0..9
    flat = bins + BINS * np.arange(features)  # one bincount for every input at once
    flat = flat[~np.isnan(values)]
    return np.bincount(flat, minlength=features * BINS).reshape(features, BINS).astype(np.int64)


def psi(counts: np.ndarray) -> np.ndarray:
    """Per input, the population stability index of `counts` `[F, BINS]` against 10% per bin."""
    totals = counts.sum(axis=1, keepdims=True)
    actual = np.where(totals > 0, counts / np.maximum(totals, 1), 1.0 / BINS)
    actual = np.maximum(actual, _SMOOTH)
    expected = 1.0 / BINS
    return ((actual - expected) * np.log(actual / expected)).sum(axis=1)


class DriftWindow:
    """One model version's window of binned inputs, shared through a file when `path` is set."""

    def __init__(self, profile: Profile, window_seconds: float, path: Path | None) -> None:
        self.profile = profile
        self.slot_seconds = window_seconds / SLOTS
        self.path = path
        self.rows: list[np.ndarray] = []  # requests' inputs not yet binned (binned per flush)
        self.buffered = 0
        self.last_flush = time.monotonic()
        shape = (SLOTS, len(profile.names), BINS)
        if path is None:
            self.counts = np.zeros(shape, dtype=np.int64)
            self.stamps = np.full(SLOTS, -1, dtype=np.int64)
        else:
            size = 8 * (SLOTS + math.prod(shape))
            with open(path, "a+b") as f:  # every worker opens the same file; the first sizes it
                fcntl.flock(f, fcntl.LOCK_EX)
                if f.seek(0, 2) < size:
                    f.truncate(size)
                    f.seek(0)
                    f.write(np.full(SLOTS, -1, dtype=np.int64).tobytes())
                fcntl.flock(f, fcntl.LOCK_UN)
            memory = np.memmap(path, dtype=np.int64, mode="r+", shape=(SLOTS + math.prod(shape),))
            self.stamps = memory[:SLOTS]
            self.counts = memory[SLOTS:].reshape(shape)

    def observe(self, x: np.ndarray | dict[str, np.ndarray]) -> None:
        """Keep a request's inputs; they are binned together and shared with the other workers
        at most once a second (or every MAX_BUFFERED rows), so a request pays a list append."""
        if not self.profile.names:
            return
        values = numbers_of(x, self.profile)
        self.rows.append(values)
        self.buffered += len(values)
        now = time.monotonic()
        if now - self.last_flush >= FLUSH_SECONDS or self.buffered >= MAX_BUFFERED:
            self.flush()
            self.last_flush = now

    def flush(self) -> None:
        if not self.rows:
            return
        pending = bin_counts(np.concatenate(self.rows), self.profile.deciles)
        self.rows, self.buffered = [], 0
        slot = int(time.time() // self.slot_seconds)
        with self._locked():
            index = slot % SLOTS
            if self.stamps[index] != slot:  # a slot from an older round of the window: reuse
                self.counts[index] = 0
                self.stamps[index] = slot
            self.counts[index] += pending

    def totals(self) -> np.ndarray:
        """`[F, BINS]` counts of the slots still inside the window (after flushing our own)."""
        self.flush()
        slot = int(time.time() // self.slot_seconds)
        live = (self.stamps > slot - SLOTS) & (self.stamps <= slot)
        return self.counts[live].sum(axis=0)

    def report(self) -> dict[str, Any]:
        counts = self.totals()
        values = psi(counts)
        order = np.argsort(-values, kind="stable")
        return {
            "window_seconds": self.slot_seconds * SLOTS,
            "rows": int(counts.sum(axis=1).max()) if len(counts) else 0,
            "threshold": SIGNIFICANT,
            "inputs": [
                {
                    "name": self.profile.names[j],
                    "psi": float(values[j]),
                    "shifted": bool(values[j] > SIGNIFICANT),
                    "share_by_decile": (counts[j] / max(int(counts[j].sum()), 1)).round(4).tolist(),
                }
                for j in order.tolist()
            ],
        }

    def _locked(self) -> Any:
        return _FileLock(self.path)


def window_for(runtime: Any, config: Any) -> DriftWindow | None:
    """The drift window of a loaded model version (None without a profile with deciles), made
    once per runtime: its counts in a file under the runtime directory that every worker of the
    same model file shares (in the process without one)."""
    if runtime.drift is None:
        profile = runtime.info.profile
        if profile is None or profile.deciles.shape[1] != BINS - 1:
            runtime.drift = False
        else:
            path = None
            if config.runtime_dir:
                tag = hashlib.sha256(str(runtime.path).encode()).hexdigest()[:16]
                path = Path(config.runtime_dir) / f"drift-{tag}.bin"
            runtime.drift = DriftWindow(profile, config.drift_window_secs, path)
    return runtime.drift or None


class _FileLock:
    """An exclusive lock on `path` (no-op without one)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file: Any = None

    def __enter__(self) -> None:
        if self.path is not None:
            self.file = open(self.path, "rb")
            fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
