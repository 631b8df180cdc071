"""The trainer's raw-column preprocessing (models/tabular.py) as ONNX nodes in front of the MLP, so
that the model file alone turns raw rows into predictions in any ONNX runtime.

One graph input per raw column, shaped `[batch, 1]`:

- numeric and boolean columns: float32, NaN for a missing value (booleans as 1/0);
  `IsNaN` -> `Where` (the training median, or the more frequent boolean) and, where training had
  missing cells, the 0/1 indicator `Cast(IsNaN)`;
- categorical columns: string; a cell equal to one of the training's missing-value texts (the
  empty string always among them) is missing. `Equal` against the kept categories gives the
  one-hot columns; the "other" column is 1 - (known + missing), so a category never seen in
  training lands there; the "missing" column is the missing flag.

Everything is plain ONNX (`Equal` on strings needs opset 19). The encoded columns are concatenated
in the order of `Preprocessor.encoded_names()` into the MLP's input tensor.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnserve.errors import UsageError
from bnserve.models.tabular import BOOLEAN, CATEGORICAL, Column, Preprocessor, RawTable

#: `Equal` accepts strings from this opset on.
MIN_STRING_OPSET = 19
#: The text a missing categorical cell is sent as (the service and `bnserve predict` use it).
MISSING_TEXT = ""
BATCH = "batch"


def missing_texts(pre: Preprocessor) -> list[str]:
    """The texts that mean missing in a categorical input: the training's, and the empty one."""
    return sorted({MISSING_TEXT, *pre.missing_values})


def check_opset(pre: Preprocessor, opset: int) -> None:
    if any(c.kind == CATEGORICAL for c in pre.columns) and opset < MIN_STRING_OPSET:
        raise UsageError(
            f"--opset {opset}: categorical inputs need opset {MIN_STRING_OPSET} or newer "
            "(string comparison); omit --opset or choose a newer one"
        )


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _numeric(col: Column, x: str, nodes: list, inits: list) -> list[str]:
    fill, isnan = f"{x}.fill", f"{x}.isnan"
    inits.append(_const(fill, np.array([[col.fill]], dtype=np.float32)))
    nodes.append(helper.make_node("IsNaN", [x], [isnan], name=f"{x}.isnan"))
    nodes.append(helper.make_node("Where", [isnan, fill, x], [f"{x}.value"], name=f"{x}.impute"))
    out = [f"{x}.value"]
    if col.indicator:
        nodes.append(
            helper.make_node(
                "Cast", [isnan], [f"{x}.missing"], name=f"{x}.indicator", to=TensorProto.FLOAT
            )
        )
        out.append(f"{x}.missing")
    return out


def _count(flags: str, width: int, out: str, nodes: list, inits: list) -> None:
    """Per row, how many of `width` boolean flags are set (a float `[batch, 1]`): Cast + MatMul,
    which behave the same at every opset, unlike the Reduce operators."""
    ones = f"{out}.ones"
    inits.append(_const(ones, np.ones((width, 1), dtype=np.float32)))
    nodes.append(helper.make_node("Cast", [flags], [f"{flags}.f"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("MatMul", [f"{flags}.f", ones], [out], name=f"{out}.count"))


def _categorical(col: Column, x: str, pre: Preprocessor, nodes: list, inits: list) -> list[str]:
    tokens = missing_texts(pre)
    inits.append(_const(f"{x}.missing_texts", np.array([tokens], dtype=object)))
    nodes.append(helper.make_node("Equal", [x, f"{x}.missing_texts"], [f"{x}.is_token"]))
    _count(f"{x}.is_token", len(tokens), f"{x}.missing_count", nodes, inits)
    inits.append(_const(f"{x}.zero", np.zeros((1, 1), dtype=np.float32)))
    nodes.append(
        helper.make_node("Greater", [f"{x}.missing_count", f"{x}.zero"], [f"{x}.is_missing"])
    )
    nodes.append(
        helper.make_node("Cast", [f"{x}.is_missing"], [f"{x}.missing"], to=TensorProto.FLOAT)
    )
    out = []
    if col.categories:
        inits.append(_const(f"{x}.categories", np.array([col.categories], dtype=object)))
        nodes.append(helper.make_node("Equal", [x, f"{x}.categories"], [f"{x}.is_category"]))
        nodes.append(
            helper.make_node("Cast", [f"{x}.is_category"], [f"{x}.one_hot"], to=TensorProto.FLOAT)
        )
        out.append(f"{x}.one_hot")
    if col.other:
        if col.categories:
            _count(f"{x}.is_category", len(col.categories), f"{x}.known", nodes, inits)
            nodes.append(helper.make_node("Add", [f"{x}.known", f"{x}.missing"], [f"{x}.seen"]))
        else:
            nodes.append(helper.make_node("Identity", [f"{x}.missing"], [f"{x}.seen"]))
        inits.append(_const(f"{x}.one", np.ones((1, 1), dtype=np.float32)))
        nodes.append(helper.make_node("Sub", [f"{x}.one", f"{x}.seen"], [f"{x}.other"]))
        out.append(f"{x}.other")
    if col.missing_column:
        out.append(f"{x}.missing")
    return out


def preprocessing_nodes(
    pre: Preprocessor, features: str
) -> tuple[list[onnx.ValueInfoProto], list[onnx.NodeProto], list[TensorProto]]:
    """(graph inputs, nodes, initializers) that write the encoded `[batch, F]` float32 tensor
    `features` from one input per raw column."""
    inputs, nodes, inits = [], [], []
    parts: list[str] = []
    for col in pre.columns:
        x = col.name
        if col.kind == CATEGORICAL:
            inputs.append(helper.make_tensor_value_info(x, TensorProto.STRING, [BATCH, 1]))
            parts += _categorical(col, x, pre, nodes, inits)
        else:
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [BATCH, 1]))
            parts += _numeric(col, x, nodes, inits)
    nodes.append(helper.make_node("Concat", parts, [features], name="features.concat", axis=1))
    return inputs, nodes, inits


def with_preprocessing(model: onnx.ModelProto, pre: Preprocessor, input_name: str) -> None:
    """Replace the MLP's float input `input_name` by one input per raw column, in place."""
    graph = model.graph
    internal = "features"
    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    taken |= {t.name for t in graph.initializer}
    clash = [c.name for c in pre.columns if c.name in taken or c.name.startswith(internal)]
    if clash:
        raise UsageError(
            f"columns {', '.join(map(repr, clash))} have the names of tensors inside the graph; "
            "rename them in the data and train again"
        )
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = internal
    inputs, nodes, inits = preprocessing_nodes(pre, internal)
    del graph.input[:]
    graph.input.extend(inputs)
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *old])
    graph.initializer.extend(inits)


def raw_probes(
    pre: Preprocessor, encoded_mean: np.ndarray, encoded_std: np.ndarray, n: int, seed: int
) -> dict[str, np.ndarray]:
    """Probe rows for a raw-input model, one array per input: numeric values drawn around their
    training mean and std (with extremes) and some missing, categories including a missing cell
    and one never seen in training. Seeded: the same probes every run."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    names = pre.encoded_names()
    for col in pre.columns:
        if col.kind == CATEGORICAL:
            choices = [*col.categories, "never-seen-in-training", MISSING_TEXT]
            feeds[col.name] = rng.choice(np.array(choices, dtype=object), size=(n, 1))
            continue
        j = names.index(col.name)
        z = rng.standard_normal(n)
        z[:4] = (4.0, -4.0, 8.0, -8.0)
        values = encoded_mean[j] + encoded_std[j] * z
        if col.kind == BOOLEAN:  # only 0 and 1 are values
            values = rng.integers(0, 2, size=n).astype(np.float64)
        values[rng.random(n) < 0.15] = np.nan
        feeds[col.name] = values.astype(np.float32)[:, None]
    return feeds


def encode_probes(pre: Preprocessor, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The numpy preprocessing (models/tabular.py) of `feeds`: the parity gate's reference input."""
    token = MISSING_TEXT if MISSING_TEXT in pre.missing_values else pre.missing_values[0]
    columns = []
    for col in pre.columns:
        values = feeds[col.name][:, 0]
        if col.kind == CATEGORICAL:
            columns.append([token if v == MISSING_TEXT else str(v) for v in values])
        elif col.kind == BOOLEAN:
            columns.append([token if np.isnan(v) else str(int(v)) for v in values])
        else:
            columns.append([token if np.isnan(v) else repr(float(v)) for v in values])
    return pre.transform(RawTable(pre.names, columns, "probes"))
