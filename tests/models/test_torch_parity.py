"""The numpy network against an equivalent PyTorch 2.13 model with the same initial weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnserve.models.network import NetworkSpec, forward_train, init_params, loss_and_grads  # noqa: E402
from bnserve.models.optim import Adam  # noqa: E402

TORCH_ACTIVATIONS = {
    "relu": lambda slope: torch.nn.ReLU(),
    "leaky_relu": lambda slope: torch.nn.LeakyReLU(slope),
    "tanh": lambda slope: torch.nn.Tanh(),
    "sigmoid": lambda slope: torch.nn.Sigmoid(),
}


def torch_model(spec: NetworkSpec, params: dict[str, np.ndarray]) -> torch.nn.Sequential:
    """The same architecture in torch (float64), weights copied (torch stores W as [out, in])."""
    mods: list[torch.nn.Module] = []
    fan_in = spec.n_features
    for i, width in enumerate(spec.hidden):
        p = f"hidden.{i}."
        linear = torch.nn.Linear(fan_in, width, bias=spec.bn != "before").double()
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(params[p + "W"].T))
            if linear.bias is not None:
                linear.bias.copy_(torch.from_numpy(params[p + "b"]))
        bn = torch.nn.BatchNorm1d(width, eps=spec.bn_eps, momentum=spec.bn_momentum).double()
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(params[p + "gamma"]))
            bn.bias.copy_(torch.from_numpy(params[p + "beta"]))
        act = TORCH_ACTIVATIONS[spec.activation](spec.leaky_slope)
        mods += [linear, bn, act] if spec.bn == "before" else [linear, act, bn]
        fan_in = width
    out = torch.nn.Linear(fan_in, spec.n_classes).double()
    with torch.no_grad():
        out.weight.copy_(torch.from_numpy(params["output.W"].T))
        out.bias.copy_(torch.from_numpy(params["output.b"]))
    return torch.nn.Sequential(*mods, out)


def torch_named(model: torch.nn.Sequential, spec: NetworkSpec) -> dict[str, torch.Tensor]:
    """Our parameter names -> the torch tensors holding the same values."""
    names: dict[str, torch.Tensor] = {}
    per_layer = 3
    for i in range(len(spec.hidden)):
        linear = model[i * per_layer]
        bn = model[i * per_layer + (1 if spec.bn == "before" else 2)]
        names[f"hidden.{i}.W"] = linear.weight
        if linear.bias is not None:
            names[f"hidden.{i}.b"] = linear.bias
        names[f"hidden.{i}.gamma"] = bn.weight
        names[f"hidden.{i}.beta"] = bn.bias
        names[f"hidden.{i}.running_mean"] = bn.running_mean
        names[f"hidden.{i}.running_var"] = bn.running_var
    names["output.W"], names["output.b"] = model[-1].weight, model[-1].bias
    return names


def as_ours(name: str, t: torch.Tensor) -> np.ndarray:
    a = t.detach().numpy()
    return a.T if name.endswith(".W") else a


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-8)))


@pytest.fixture(params=["before", "after"])
def setup(request):
    rng = np.random.default_rng(7)
    spec = NetworkSpec(
        n_features=6, n_classes=4, hidden=(16, 12), activation="relu", bn=request.param
    )
    params = init_params(spec, rng)
    X = rng.standard_normal((32, 6))
    y = rng.integers(0, 4, 32)
    return spec, params, X, y


def test_one_forward_backward_matches_torch(setup):
    spec, params, X, y = setup
    model = torch_model(spec, params).train()
    loss_t = torch.nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y))
    loss_t.backward()
    loss, grads, _ = loss_and_grads(spec, params, X, y)
    assert loss == pytest.approx(loss_t.item(), rel=1e-6)
    for name, tensor in torch_named(model, spec).items():
        if name in grads:
            assert max_rel(grads[name], as_ours(name, tensor.grad)) < 1e-6, name


def test_twenty_adam_steps_match_torch(setup):
    spec, params, X, y = setup
    model = torch_model(spec, params).train()
    opt_t = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    ours = Adam(0.9, 0.999, 1e-8)
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = rng.choice(len(y), 16, replace=False)
        opt_t.zero_grad()
        torch.nn.functional.cross_entropy(
            model(torch.from_numpy(X[batch])), torch.from_numpy(y[batch])
        ).backward()
        opt_t.step()
        _, grads, _ = loss_and_grads(spec, params, X[batch], y[batch])
        ours.step(params, grads, 1e-2)
    for name, tensor in torch_named(model, spec).items():
        # relative to each array's scale: elementwise relative error is meaningless near zero
        expected = as_ours(name, tensor)
        err = np.max(np.abs(params[name] - expected)) / max(np.max(np.abs(expected)), 1e-12)
        assert err < 1e-6, f"{name}: {err:.2e}"


def test_running_statistics_follow_pytorch_convention(setup):
    spec, params, X, _ = setup
    model = torch_model(spec, params).train()
    model(torch.from_numpy(X))
    forward_train(spec, params, X)
    for name, tensor in torch_named(model, spec).items():
        if "running" in name:
            np.testing.assert_allclose(params[name], tensor.numpy(), rtol=1e-9, atol=1e-12)
