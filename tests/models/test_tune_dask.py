"""`bnserve tune --dask`: the trials run on a real Dask LocalCluster (2 worker processes) and
give the same trials.csv (everything but the timings) as local processes, and a search started
locally resumes on Dask under the same rules."""

from __future__ import annotations

import csv

import pytest

from bnserve.cli import main

pytest.importorskip("distributed", reason="the dask extra is not installed")


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    return sorted(rows, key=lambda r: int(r["trial"]))


def test_dask_runs_the_same_trials_and_resumes(tmp_path) -> None:
    common = ["tune", "sklearn:iris", "--trials", "4", "--rounds", "2", "--epochs", "3"]
    common += ["--jobs", "2", "--quiet", "--seed", "5"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--out", str(tmp_path / "dask"), "--dask", "local"]) == 0
    local, dask = _rows(tmp_path / "local" / "trials.csv"), _rows(tmp_path / "dask" / "trials.csv")
    assert len(local) == 4 and local == dask
    # a search interrupted after round 0 (two trials on disk) continues on Dask
    partial = tmp_path / "resumed"
    partial.mkdir()
    lines = (tmp_path / "local" / "trials.csv").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if line.split(",")[1] == "0"]
    (partial / "trials.csv").write_text("\n".join(kept) + "\n")
    assert main([*common, "--out", str(partial), "--dask", "local", "--resume"]) == 0
    assert _rows(partial / "trials.csv") == local
