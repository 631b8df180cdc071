"""The model lifecycle: create the onnxruntime session, warm it up, run it.

Sessions are created in each gunicorn worker after the fork (onnxruntime's thread pools and CUDA
contexts are not fork-safe), with explicit thread counts, sequential execution and no spinning,
so N single-threaded workers on N cores do not fight over them. The HTTP layers only call
`run` / `probabilities`; nothing here knows about requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bnserve.errors import ModelError
from bnserve.service import tracing
from bnserve.service.columns import empty_feeds, unknown_categories
from bnserve.service.config import DEVICES
from bnserve.service.metadata import ModelInfo, load_info
from bnserve.service.profile import out_of_range, refuse

log = logging.getLogger("bnserve.service")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """Options for one session per single-threaded worker: no pools fighting, no spinning."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def cuda_available() -> bool:
    """Whether this onnxruntime build lists the CUDA provider (its libraries may still be missing)."""
    return CUDA in ort.get_available_providers()


def create_session(
    path: Path, device: str, intra_op_threads: int = 1
) -> tuple[ort.InferenceSession, str]:
    """Create a session on `device` and return it with the device it really runs on.

    onnxruntime silently falls back to CPU when the CUDA libraries are missing, so the first
    provider is checked: `cuda` refuses to run on CPU, `auto` says in the log what it got.
    """
    if device not in DEVICES:
        raise ModelError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not cuda_available():
        raise ModelError(
            f"--device cuda: this onnxruntime {ort.__version__} has no {CUDA} "
            f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
            "or use --device cpu"
        )
    want_cuda = device == "cuda" or (device == "auto" and cuda_available())
    providers = [CUDA, CPU] if want_cuda else [CPU]
    try:
        session = ort.InferenceSession(
            str(path), sess_options=session_options(intra_op_threads), providers=providers
        )
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ModelError(f"{path}: onnxruntime cannot load it: {exc}") from exc
    first = session.get_providers()[0]
    if device == "cuda" and first != CUDA:
        raise ModelError(
            f"--device cuda: onnxruntime fell back to {first} for {path} (the CUDA libraries "
            "could not be loaded, see the onnxruntime warning above); refusing to serve on CPU"
        )
    used = "cuda" if first == CUDA else "cpu"
    if device == "auto":
        log.info("--device auto: %s runs on %s (%s)", path, used, first)
    return session, used


@dataclass
class ModelRuntime:
    """One loaded model version: its session, interface and the device it runs on."""

    name: str
    version: int
    path: Path
    info: ModelInfo
    session: ort.InferenceSession
    device: str
    n_classes: int
    load_seconds: float
    observe: Callable[[float], None] | None = None  # the inference latency histogram
    count_unknown: Callable[[str, int], None] | None = None  # unknown categories, by column
    count_out_of_range: Callable[[str, int], None] | None = None  # outside the profile, by input
    drift: Any = None  # the drift window (service/drift.py), made on first use; False: none

    @classmethod
    def load(
        cls,
        path: Path,
        name: str,
        version: int,
        device: str = "cpu",
        intra_op_threads: int = 1,
        output_kind: str = "auto",
    ) -> ModelRuntime:
        """Describe, load and warm up one model file; raises ModelError with the reason."""
        start = time.perf_counter()
        info = load_info(path, output_kind)
        session, used = create_session(path, device, intra_op_threads)
        expected = [c.name for c in info.columns] if info.columns else [info.input.name]
        if sorted(i.name for i in session.get_inputs()) != sorted(expected):
            raise ModelError(f"{path}: onnxruntime sees inputs other than {expected}")
        runtime = cls(name, version, path, info, session, used, 0, 0.0)
        runtime.n_classes = runtime._warm_up()
        runtime.load_seconds = time.perf_counter() - start
        return runtime

    def _warm_up(self) -> int:
        """One run before serving (first runs allocate and are slow); returns the class count."""
        rows = self.info.fixed_batch or 1
        if self.info.columns is not None:
            feeds = empty_feeds(self.info.columns, rows)  # every cell missing: imputed
        else:
            x = np.zeros((rows, self.info.n_features), dtype=self.info.input.dtype)
            feeds = {self.info.input.name: x}
        try:
            (scores,) = self.session.run([self.info.score_output], feeds)
        except Exception as exc:
            raise ModelError(f"{self.path}: warm-up inference failed: {exc}") from exc
        if scores.ndim != 2 or scores.shape[0] != rows:
            raise ModelError(
                f"{self.path}: output {self.info.score_output!r} has shape {list(scores.shape)} "
                f"for {rows} example(s), expected [{rows}, classes]"
            )
        n_classes = int(scores.shape[1])
        if self.info.labels is not None and len(self.info.labels) != n_classes:
            raise ModelError(
                f"{self.path}: {len(self.info.labels)} labels for {n_classes} output classes"
            )
        return n_classes

    @cached_property
    def labels(self) -> tuple:
        """Class labels: the model's own, else "0", "1", ..."""
        return self.info.labels or tuple(str(i) for i in range(self.n_classes))

    @cached_property
    def label_keys(self) -> list[str]:
        """Labels as JSON object keys (computed once, used on every simple-API answer)."""
        return [str(label) for label in self.labels]

    def signature(self) -> dict[str, Any]:
        """What clients depend on: input name, dtype and width, feature names, outputs, labels.
        A reload that changes any of it breaks existing clients (service/reload.py compares)."""
        info = self.info
        return {
            "input": info.input.name,
            "datatype": str(np.dtype(info.input.dtype)),
            "n_features": info.n_features,
            "feature_names": list(info.feature_names) if info.feature_names else None,
            "outputs": [o.name for o in info.outputs],
            "labels": [str(label) for label in self.labels],
            "columns": [(c.name, c.kind) for c in info.columns] if info.columns else None,
        }

    @cached_property
    def feature_index(self) -> dict[str, int]:
        """Feature name -> column, for requests that send features by name."""
        return {name: i for i, name in enumerate(self.info.feature_names or ())}

    def run(
        self, output_names: list[str], x: np.ndarray | dict[str, np.ndarray]
    ) -> list[np.ndarray]:
        """Run the graph on a `[batch, F]` array (cast to the input's dtype), or on one array
        per raw column (a model with `info.columns`)."""
        if isinstance(x, dict):
            if self.count_unknown is not None and self.info.columns is not None:
                for column, n in unknown_categories(x, self.info.columns).items():
                    self.count_unknown(column, n)
            return self._timed(output_names, x)
        if x.dtype != self.info.input.dtype:
            x = x.astype(self.info.input.dtype)
        fixed = self.info.fixed_batch
        if fixed is not None and len(x) != fixed:
            return self._run_fixed(output_names, x, fixed)
        return self._timed(output_names, {self.info.input.name: x})

    def _timed(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if tracing.ACTIVE is not None:
            with tracing.model_span(tracing.ACTIVE, self.name, self.version):
                return self._observed(output_names, feeds)
        return self._observed(output_names, feeds)

    def _observed(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.observe is None:
            return self.session.run(output_names, feeds)
        start = time.perf_counter()
        outputs = self.session.run(output_names, feeds)
        self.observe(time.perf_counter() - start)
        return outputs

    def _run_fixed(self, output_names: list[str], x: np.ndarray, fixed: int) -> list[np.ndarray]:
        """A graph exported with a fixed batch size: run it on chunks of that size (the last
        one padded with zeros) and keep the rows asked for."""
        n = len(x)
        parts = []
        for start in range(0, n, fixed):
            chunk = x[start : start + fixed]
            if len(chunk) < fixed:
                padding = np.zeros((fixed - len(chunk), x.shape[1]), dtype=x.dtype)
                chunk = np.concatenate([chunk, padding])
            parts.append(self.run(output_names, chunk))
        return [np.concatenate([p[i] for p in parts])[:n] for i in range(len(output_names))]

    def check_inputs(
        self, x: np.ndarray | dict[str, np.ndarray], mode: str, k: float
    ) -> list[dict[str, Any]]:
        """Warnings for inputs outside the training profile (none without a profile or with
        `mode` "ignore"); counted, and refused with `mode` "reject" (BadRequestError)."""
        profile = self.info.profile
        if profile is None or mode == "ignore":
            return []
        warnings, counts = out_of_range(x, profile, k, self.info.columns)
        if self.count_out_of_range is not None:
            for name, n in counts.items():
                self.count_out_of_range(name, n)
        if warnings and mode == "reject":
            raise refuse(warnings)
        return warnings

    def probabilities(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """Class probabilities `[batch, C]` float32: softmax applied when the model gives logits."""
        (scores,) = self.run([self.info.score_output], x)
        scores = scores.astype(np.float32, copy=False)
        if self.info.output_kind == "logits":
            return softmax(scores)
        return scores


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum so large logits do not overflow."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
