"""Raw tabular columns (models/tabular.py and the CSV loader): kinds, identifier-like columns,
missing values fitted on the training rows only, categories with other/missing, and the same
encoding from the ONNX graph the converter writes (compared with the numpy encoding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bnserve.cli import main
from bnserve.converter import preprocess
from bnserve.errors import DataError
from bnserve.models.data import load_dataset
from bnserve.models.tabular import (
    BOOLEAN,
    CATEGORICAL,
    NUMERIC,
    Column,
    Preprocessor,
    RawTable,
    identifier_like,
    infer_kind,
)

MISSING = ("", "NA", "?")


def test_kinds_are_inferred_from_the_present_cells() -> None:
    assert infer_kind(["1", "2.5", "NA", "-3e2"], MISSING) == NUMERIC
    assert infer_kind(["0", "1", "1"], MISSING) == NUMERIC  # 0/1 are numbers already
    assert infer_kind(["True", "false", "", "YES", "n"], MISSING) == BOOLEAN
    assert infer_kind(["Biscoe", "Dream", "?"], MISSING) == CATEGORICAL
    assert infer_kind(["1", "two"], MISSING) == CATEGORICAL


def test_identifier_like_columns() -> None:
    assert identifier_like("", ["5", "3"], MISSING) is not None
    assert identifier_like("Unnamed: 0", ["a", "b"], MISSING) is not None
    assert identifier_like("id", ["a7", "b2", "c9"], MISSING) is not None
    assert identifier_like("id", ["a", "a", "b"], MISSING) is None  # not unique: a real feature
    assert identifier_like("n", [str(i) for i in range(100, 160)], MISSING) is not None
    assert identifier_like("n", [str(i) for i in range(0, 120, 2)], MISSING) is None
    assert identifier_like("n", [str(i) for i in range(10)], MISSING) is None  # too few rows


def _pre() -> tuple[Preprocessor, RawTable]:
    table = RawTable(
        ["size", "flag", "color"],
        [
            ["1", "3", "NA", "100", "5", "7"],
            ["yes", "no", "", "yes", "yes", "no"],
            ["red", "red", "blue", "red", "green", ""],
        ],
        "t.csv",
    )
    columns = [Column("size", NUMERIC), Column("flag", BOOLEAN), Column("color", CATEGORICAL)]
    return Preprocessor(columns, MISSING, min_frequency=2), table


def test_fit_uses_the_training_rows_only_and_encodes_every_row() -> None:
    pre, table = _pre()
    pre.fit(table, np.array([0, 1, 2, 4, 5]))  # row 3 (size 100) is not training data
    size, flag, color = pre.columns
    assert size.fill == 4.0 and size.indicator  # median of 1, 3, 5, 7
    assert flag.fill == 0.0 and flag.indicator  # yes, no, no, yes: a tie goes to 0 (false)
    assert color.categories == ["red"] and color.other and color.missing_column
    assert pre.encoded_names() == [
        "size", "size (<missing>)", "flag", "flag (<missing>)",
        "color=red", "color=<other>", "color=<missing>",
    ]  # fmt: skip
    X = pre.transform(table)
    np.testing.assert_array_equal(X[2], [4, 1, 0, 1, 0, 1, 0])  # imputed, blue is rare: other
    np.testing.assert_array_equal(X[5], [7, 0, 0, 0, 0, 0, 1])  # missing color
    unseen = pre.transform(RawTable(pre.names, [["2"], ["no"], ["purple"]], "new.csv"))
    np.testing.assert_array_equal(unseen[0], [2, 0, 0, 0, 0, 1, 0])
    again = Preprocessor.from_json(pre.to_json())
    np.testing.assert_array_equal(again.transform(table), X)


def test_the_onnx_graph_encodes_as_numpy_does() -> None:
    pre, table = _pre()
    pre.fit(table, np.arange(6))
    import onnx
    from onnx import TensorProto, helper

    inputs, nodes, inits = preprocess.preprocessing_nodes(pre, "features")
    out = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", None])
    graph = helper.make_graph(nodes, "pre", inputs, [out], initializer=inits)
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = preprocess.raw_probes(pre, np.zeros(7), np.ones(7), 64, seed=3)
    (encoded,) = session.run(None, feeds)
    np.testing.assert_allclose(encoded, preprocess.encode_probes(pre, feeds), rtol=1e-6)
    assert np.isnan(feeds["size"]).any() and (feeds["color"] == "").any()
    assert (feeds["color"] == "never-seen-in-training").any()


def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_every_bad_column_is_named_at_once(tmp_path) -> None:
    data = _csv(tmp_path / "d.csv", "a,b,c,y\n1,inf,2,x\n-inf,4,inf,y\n")
    with pytest.raises(DataError) as error:
        load_dataset(data)
    message = str(error.value)
    assert "column 'a'" in message and "column 'b'" in message and "column 'c'" in message


def test_column_selection_and_its_mistakes(tmp_path, capsys) -> None:
    rows = "".join(f"{i % 7},{'ab'[i % 2]},{i % 3},{'xy'[i % 2]}\n" for i in range(40))
    data = _csv(tmp_path / "d.csv", "a,s,noise,y\n" + rows)
    assert load_dataset(data, options=None).preprocessor.names == ["a", "s", "noise"]
    out = tmp_path / "o"
    assert main(["train", data, "--features", "a,s", "--epochs", "2", "--out", str(out)]) == 0
    assert "noise" not in capsys.readouterr().err
    assert main(["train", data, "--drop", "nope", "--out", str(out)]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["train", data, "--features", "y", "--out", str(out)]) == 2
    assert "'y' is the label column" in capsys.readouterr().err


def test_all_numeric_csvs_keep_one_float_input(tmp_path) -> None:
    rows = "".join(f"{i % 7},{i % 3},{'xy'[i % 2]}\n" for i in range(30))
    data = load_dataset(_csv(tmp_path / "d.csv", "a,b,y\n" + rows))
    assert data.table is None and data.X.shape == (30, 2)
