"""Random checkpoints for the converter tests, built with models.network.init_params plus random
BN statistics (no trainer needed), and a few helpers to run ONNX files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bnserve.models.checkpoint import Checkpoint, save_checkpoint
from bnserve.models.network import NetworkSpec, init_params


@dataclass(frozen=True)
class NetConfig:
    n_features: int = 6
    n_classes: int = 3
    hidden: tuple[int, ...] = (16, 8)
    bn: str = "before"
    activation: str = "relu"
    leaky_slope: float = 0.05
    eps: float = 1e-5
    var_range: tuple[float, float] = (1e-2, 10.0)  # log-uniform
    gamma_max: float = 3.0  # uniform in [-gamma_max, gamma_max], some exact zeros
    constant_feature: bool = True
    # None: input means N(0, 5) whatever the std, so |mean / std| reaches ~100 (ill-conditioned
    # for the folded bias); a number k: mean = std * N(0, k), a data set whose features sit within
    # a few of their own standard deviations of zero.
    input_offset_sd: float | None = None
    population: bool = False
    seed: int = 0


def random_checkpoint(cfg: NetConfig) -> Checkpoint:
    rng = np.random.default_rng(cfg.seed)
    spec = NetworkSpec(
        n_features=cfg.n_features,
        n_classes=cfg.n_classes,
        hidden=cfg.hidden,
        activation=cfg.activation,
        bn=cfg.bn,
        leaky_slope=cfg.leaky_slope,
        bn_eps=cfg.eps,
    )
    p = init_params(spec, rng)
    lo, hi = np.log10(cfg.var_range[0]), np.log10(cfg.var_range[1])

    def bn_stats(width: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(0, 1, width), 10 ** rng.uniform(lo, hi, width)

    for i, width in enumerate(cfg.hidden):
        if cfg.bn == "none":
            continue
        gamma = rng.uniform(-cfg.gamma_max, cfg.gamma_max, width)
        gamma[rng.random(width) < 0.1] = 0.0  # a dead unit: its folded row/column is all zero
        p[f"hidden.{i}.gamma"] = gamma
        p[f"hidden.{i}.beta"] = rng.normal(0, 1, width)
        p[f"hidden.{i}.running_mean"], p[f"hidden.{i}.running_var"] = bn_stats(width)
        if cfg.population:
            p[f"hidden.{i}.population_mean"], p[f"hidden.{i}.population_var"] = bn_stats(width)
        if f"hidden.{i}.b" in p:
            p[f"hidden.{i}.b"] = rng.normal(0, 0.5, width)
    p["output.b"] = rng.normal(0, 0.5, cfg.n_classes)
    p["input.std"] = 10 ** rng.uniform(-1, 1, cfg.n_features)
    if cfg.input_offset_sd is None:
        p["input.mean"] = rng.normal(0, 5, cfg.n_features)
    else:
        p["input.mean"] = p["input.std"] * rng.normal(0, cfg.input_offset_sd, cfg.n_features)
    if cfg.constant_feature:
        p["input.std"][0] = 1.0  # how the trainer stores a constant feature
    return Checkpoint(
        spec=spec,
        params=p,
        class_names=[f"class_{c}" for c in range(cfg.n_classes)],
        feature_names=[f"f{j}" for j in range(cfg.n_features)],
        stats_default="running",
        data_fingerprint="sha256:test",
    )


def write_checkpoint(cfg_or_ckpt: NetConfig | Checkpoint, path: Path) -> Path:
    ckpt = random_checkpoint(cfg_or_ckpt) if isinstance(cfg_or_ckpt, NetConfig) else cfg_or_ckpt
    save_checkpoint(ckpt, path)
    return path


def run_onnx(
    path: Path | str, X: np.ndarray, level: str = "all", output: str = "probabilities"
) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run([output], {"input": np.asarray(X, dtype=np.float32)})[0]


def raw_inputs(ckpt: Checkpoint, n: int, seed: int = 123) -> np.ndarray:
    """Rows in raw feature units around the stored standardization (float32, as served)."""
    rng = np.random.default_rng(seed)
    mean, std = ckpt.params["input.mean"], ckpt.params["input.std"]
    return (mean + std * rng.standard_normal((n, mean.shape[0]))).astype(np.float32)
