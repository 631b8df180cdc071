"""Model discovery: files, Triton-layout repositories, numeric versions, ignored folders."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bnserve.errors import ModelError
from bnserve.service.registry import ModelRegistry
from bnserve.service.repository import default_version, find_models, parse_version
from tests.service.support import build_mlp_classifier


def test_versions_are_compared_as_numbers_and_odd_folders_ignored(
    model_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bnserve.service"):
        repo = find_models(model_repo)
    assert list(repo) == ["clf", "foreign"]  # "empty" has no versions
    assert list(repo["clf"]) == [1, 2, 10]
    assert default_version(repo["clf"]) == 10  # as strings, "2" would sort after "10"
    assert repo["clf"][10] == model_repo / "clf" / "10" / "model.onnx"
    warnings = caplog.text
    assert "notes: not a positive-integer version folder" in warnings
    assert "clf/0: not a positive-integer version folder" in warnings
    assert "clf/3: no model.onnx inside" in warnings
    assert "empty: no <version>/model.onnx inside" in warnings


def test_single_file_is_its_stem_version_1_or_the_given_name(tmp_path: Path) -> None:
    path = build_mlp_classifier(tmp_path / "digits.onnx")
    assert find_models(path) == {"digits": {1: path}}
    assert find_models(path, "mnist") == {"mnist": {1: path}}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.onnx", "no such model file or repository"),
        (lambda p: (p / "x.txt").write_text("x") and p / "x.txt", "expected an .onnx file"),
        (lambda p: p, "no models found"),
    ],
)
def test_bad_model_paths_say_what_was_expected(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        find_models(make(tmp_path))


def test_model_name_must_exist_in_a_repository(model_repo: Path) -> None:
    with pytest.raises(ModelError, match="--model-name 'nope' is not in"):
        find_models(model_repo, "nope")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", 1), ("10", 10), ("01", 1), ("0", None), ("-1", None), ("v1", None), ("١", None)],
)
def test_parse_version(text: str, expected: int | None) -> None:
    assert parse_version(text) == expected


def test_registry_lookups_and_errors(model_repo: Path) -> None:
    registry = ModelRegistry(find_models(model_repo))
    assert registry.default_model is None  # two models and no --model-name
    registry.load_all("cpu", 1, "auto")
    assert registry.ready
    assert registry.get("clf").version == 10
    assert registry.get("clf", "2").version == 2
    with pytest.raises(Exception, match="has no version '7'"):
        registry.get("clf", "7")
    with pytest.raises(Exception, match="unknown model 'nope'"):
        registry.get("nope")
    with pytest.raises(Exception, match="several models"):
        registry.get(None)


def test_a_model_that_fails_to_load_is_not_ready_instead_of_raising(tmp_path: Path) -> None:
    bad = tmp_path / "repo" / "broken" / "1" / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x08\x07 truncated")
    registry = ModelRegistry(find_models(tmp_path / "repo"))
    registry.load_all("cpu", 1, "auto")  # must not raise: gunicorn would halt
    assert not registry.ready
    with pytest.raises(Exception, match="is not ready") as info:
        registry.get("broken")
    assert info.value.http_status == 503


def _state(generation: int, path: Path, sha: str) -> dict:
    return {
        "generation": generation,
        "draining": False,
        "models": {"m": {"1": {"path": str(path), "sha256": sha, "source": str(path)}}},
    }


def test_an_older_state_never_replaces_a_newer_one(tmp_path: Path) -> None:
    """A gthread worker may read the state file, then lose the race to a newer read."""
    old = build_mlp_classifier(tmp_path / "old.onnx", seed=1)
    new = build_mlp_classifier(tmp_path / "new.onnx", seed=2)
    registry = ModelRegistry({"m": {1: old}})
    registry.load_all("cpu", 1, "auto")
    registry.apply_state(_state(2, new, "b" * 64), "cpu", 1, "auto")
    assert registry.get("m").path == new
    registry.apply_state(_state(1, old, "a" * 64), "cpu", 1, "auto")  # read before gen 2
    assert registry.get("m").path == new
    assert registry.generation == 2


def test_concurrent_switches_load_a_changed_model_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    from bnserve.service.runtime import ModelRuntime

    old = build_mlp_classifier(tmp_path / "old.onnx", seed=1)
    new = build_mlp_classifier(tmp_path / "new.onnx", seed=2)
    registry = ModelRegistry({"m": {1: old}})
    registry.load_all("cpu", 1, "auto")
    loads = []
    real_load = ModelRuntime.load.__func__

    def slow_load(cls, path, *args, **kwargs):
        loads.append(path)
        time.sleep(0.2)  # both threads are inside apply_state at once without a lock
        return real_load(cls, path, *args, **kwargs)

    monkeypatch.setattr(ModelRuntime, "load", classmethod(slow_load))
    state = _state(1, new, "b" * 64)
    threads = [
        threading.Thread(target=registry.apply_state, args=(state, "cpu", 1, "auto"))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [new]
    assert registry.get("m").path == new
