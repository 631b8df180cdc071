"""Optimizers that update a flat dict of parameters in place (formulas: batchnorm.md section 7).

Weight decay is L2 added to the gradient (coupled, like `torch.optim.Adam(weight_decay=...)`), on the
linear weights and biases but never on BN's gamma and beta. Learning-rate schedules are pure
functions of the epoch.
"""

from __future__ import annotations

import math

import numpy as np

from bnserve.models.network import Params

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
SCHEDULES = ("none", "inverse", "exponential")


def decays(name: str) -> bool:
    """Weight decay applies to linear weights and biases, not to BN's gamma and beta."""
    return name.endswith((".W", ".b"))


class Optimizer:
    """Base class: `step(params, grads, lr)` updates `params` in place."""

    def __init__(self, weight_decay: float = 0.0) -> None:
        self.weight_decay = weight_decay
        self.t = 0
        self.state: dict[str, list[np.ndarray]] = {}

    def _grad(self, name: str, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        if self.weight_decay and decays(name):
            return g + self.weight_decay * p
        return g

    def step(self, params: Params, grads: Params, lr: float) -> None:
        self.t += 1
        for name, g in grads.items():
            p = params[name]
            self._update(name, p, self._grad(name, p, g), lr)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    def _buffers(self, name: str, p: np.ndarray, n: int) -> list[np.ndarray]:
        if name not in self.state:
            self.state[name] = [np.zeros_like(p) for _ in range(n)]
        return self.state[name]


class SGD(Optimizer):
    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        p -= lr * g


class Momentum(Optimizer):
    """The lectures' form: v = b1 v + (1 - b1) g (an average of gradients), w -= lr v."""

    def __init__(self, beta1: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.beta1 = beta1

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        (v,) = self._buffers(name, p, 1)
        v *= self.beta1
        v += (1 - self.beta1) * g
        p -= lr * v


class RMSprop(Optimizer):
    def __init__(self, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        self.beta2, self.eps = beta2, eps

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        (s,) = self._buffers(name, p, 1)
        s *= self.beta2
        s += (1 - self.beta2) * (g * g)
        p -= lr * g / (np.sqrt(s) + self.eps)


class Adam(Optimizer):
    """Adam with bias correction, in PyTorch's arithmetic order (for parity tests)."""

    def __init__(
        self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
    ) -> None:
        super().__init__(weight_decay)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        # In place with one scratch buffer per parameter: the update allocates nothing, which
        # matters for the 1024x1024 matrices of a large network.
        v, s, scratch = self._buffers(name, p, 3)
        v *= self.beta1
        np.multiply(g, 1 - self.beta1, out=scratch)
        v += scratch
        s *= self.beta2
        np.multiply(g, g, out=scratch)
        scratch *= 1 - self.beta2
        s += scratch
        correction1 = 1 - self.beta1**self.t
        correction2 = 1 - self.beta2**self.t
        np.sqrt(s, out=scratch)
        scratch *= 1 / math.sqrt(correction2)
        scratch += self.eps
        np.divide(v, scratch, out=scratch)
        scratch *= lr / correction1
        p -= scratch


def make_optimizer(
    name: str,
    beta1: float = 0.9,
    beta2: float = 0.999,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> Optimizer:
    """`momentum` is the averaging coefficient of the Momentum optimizer; Adam uses `beta1`."""
    if name == "sgd":
        return SGD(weight_decay)
    if name == "momentum":
        return Momentum(momentum, weight_decay)
    if name == "rmsprop":
        return RMSprop(beta2, weight_decay=weight_decay)
    if name == "adam":
        return Adam(beta1, beta2, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def scheduled_lr(lr0: float, epoch: int, schedule: str = "none", decay: float = 0.0) -> float:
    """Learning rate for `epoch` (counting from 0): `lr0 / (1 + decay * epoch)` or
    `lr0 * decay**epoch` (exponential, decay in (0, 1])."""
    if schedule == "none" or decay == 0:
        return lr0
    if schedule == "inverse":
        return lr0 / (1 + decay * epoch)
    if schedule == "exponential":
        return lr0 * decay**epoch
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
