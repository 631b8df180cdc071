"""onnxruntime speed of the folded model vs the --no-fold model vs --no-fold after onnxruntime's
own optimizer (ORT_ENABLE_ALL, saved with optimized_model_filepath, then loaded as is).

Networks: 64-256-256-10 and 784-1024-1024-10, BN "before", ReLU, RANDOM checkpoints (He init,
random BN statistics): speed does not depend on trained values. With torch installed, the small
network also as a PyTorch module (Linear-BN-ReLU, eval mode) exported by torch.onnx.export
(dynamo=False, BN kept) before and after `bnserve fold`. CPU execution provider with
onnxruntime's default thread count. Every ratio is measured in the same run.

    python bench/fold_speed.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from bnserve.converter.convert import convert_checkpoint
from bnserve.models.checkpoint import Checkpoint, save_checkpoint
from bnserve.models.network import NetworkSpec, init_params


def random_checkpoint(layers: tuple[int, ...], seed: int = 0) -> Checkpoint:
    rng = np.random.default_rng(seed)
    spec = NetworkSpec(n_features=layers[0], n_classes=layers[-1], hidden=layers[1:-1])
    p = init_params(spec, rng)
    for i, w in enumerate(spec.hidden):
        p[f"hidden.{i}.gamma"] = rng.uniform(0.5, 1.5, w)
        p[f"hidden.{i}.beta"] = rng.normal(0, 0.1, w)
        p[f"hidden.{i}.running_mean"] = rng.normal(0, 0.5, w)
        p[f"hidden.{i}.running_var"] = rng.uniform(0.5, 2.0, w)
    return Checkpoint(
        spec=spec,
        params=p,
        class_names=[str(c) for c in range(layers[-1])],
        feature_names=[f"x{j}" for j in range(layers[0])],
    )


def torch_variants(tmp: Path, layers: tuple[int, ...]) -> dict[str, Path]:
    """The same shape of network from PyTorch: its own export, and that export folded."""
    try:
        import torch
    except ImportError:
        return {}
    from bnserve.converter.foreign import fold_onnx_file

    torch.manual_seed(0)
    mods: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(layers[:-1]):
        mods += [torch.nn.Linear(a, b), torch.nn.BatchNorm1d(b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*mods, torch.nn.Linear(layers[-2], layers[-1]), torch.nn.Softmax(1))
    torch.onnx.export(
        net.eval(),
        (torch.randn(2, layers[0]),),
        str(tmp / "torch.onnx"),
        dynamo=False,
        input_names=["input"],
        dynamic_axes={"input": {0: "batch"}},
    )
    fold_onnx_file(tmp / "torch.onnx", tmp / "torch_folded.onnx")
    return {"torch export": tmp / "torch.onnx", "torch+bnserve fold": tmp / "torch_folded.onnx"}


def session(path: Path, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency(sess: ort.InferenceSession, X: np.ndarray, seconds: float) -> np.ndarray:
    for _ in range(20):
        sess.run(None, {"input": X})
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 50:
        t0 = time.perf_counter()
        sess.run(None, {"input": X})
        times.append(time.perf_counter() - t0)
    return np.array(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = ap.parse_args()
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for ln in cpuinfo.read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    print(f"onnxruntime {ort.__version__}, CPU: {cpu}, default threads; random checkpoints\n")
    header = f"{'network':<20}{'model':<22}{'nodes':<7}{'p50 b=1 us':>11}{'p99 b=1 us':>11}{'rows/s b=64':>13}{'rows/s b=1024':>15}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for layers in ((64, 256, 256, 10), (784, 1024, 1024, 10)):
            name = "-".join(map(str, layers))
            save_checkpoint(random_checkpoint(layers), tmp / "c.npz")
            convert_checkpoint(tmp / "c.npz", tmp / "folded.onnx")
            convert_checkpoint(tmp / "c.npz", tmp / "unfolded.onnx", fold=False)
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.optimized_model_filepath = str(tmp / "ort_opt.onnx")
            opts.log_severity_level = 3  # silence the "hardware specific" note: same machine
            ort.InferenceSession(
                str(tmp / "unfolded.onnx"), opts, providers=["CPUExecutionProvider"]
            )
            variants = {
                "folded": tmp / "folded.onnx",
                "no-fold": tmp / "unfolded.onnx",
                "no-fold + ORT opt": tmp / "ort_opt.onnx",
            }
            if layers[0] == 64:
                variants.update(torch_variants(tmp, layers))
            rng = np.random.default_rng(1)
            results = {}
            for label, path in variants.items():
                # Each variant at ENABLE_ALL, as a server would load it.
                sess = session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
                ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
                X1 = rng.normal(size=(1, layers[0])).astype(np.float32)
                t1 = latency(sess, X1, args.seconds)
                thr = {}
                for b in (64, 1024):
                    Xb = rng.normal(size=(b, layers[0])).astype(np.float32)
                    thr[b] = b / np.median(latency(sess, Xb, args.seconds))
                results[label] = (np.percentile(t1, 50), np.percentile(t1, 99), thr[64], thr[1024])
                p50, p99, r64, r1024 = results[label]
                print(
                    f"{name:<20}{label:<22}{sum(ops.values()):<7}{p50 * 1e6:>11.1f}{p99 * 1e6:>11.1f}{r64:>13,.0f}{r1024:>15,.0f}"
                )
            f = results["folded"]
            for label in [v for v in variants if v != "folded"]:
                o = results[label]
                print(
                    f"{'':<20}{'folded vs ' + label:<29}{o[0] / f[0]:>10.2f}x{o[1] / f[1]:>10.2f}x"
                    f"{f[2] / o[2]:>12.2f}x{f[3] / o[3]:>14.2f}x"
                )
            print()
    print("ratios: latency = other / folded (higher = folded faster); throughput = folded / other")


if __name__ == "__main__":
    main()
