"""Training-data reading and out-of-core training at data scale, in one run on generated data.

Generates `--rows` x 50 float32 features plus a 3-class label (the argmax of three fixed random
projections, so the classes are learnable) as CSV, then measures, each in its own process with
its peak RSS: `load_dataset` (bnserve's reader, models/reading.py) in float64 and float32
against pandas.read_csv producing the same X and y, and `bnserve train --stream` for one epoch of
a 32-32 network at the default --chunk-rows.

    python bench/train_scale.py [--rows 1000000] [--stream-rows 4000000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_scale import cpu_name, run

FEATURES = 50
CHUNK = 250_000

LOAD = {
    "bnserve float64": "from bnserve.models.data import load_dataset; d = load_dataset({p!r})",
    "bnserve float32": (
        "import numpy as np; from bnserve.models.data import load_dataset; "
        "d = load_dataset({p!r}, dtype=np.float32)"
    ),
    "pandas": (
        "import pandas as pd; df = pd.read_csv({p!r}); X = df.iloc[:, :-1].to_numpy(); "
        "y = df.iloc[:, -1].astype('category').cat.codes.to_numpy()"
    ),
}


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(FEATURES, 3))
    names = [f"x{j}" for j in range(FEATURES)]
    with open(path, "wb") as out:
        out.write((",".join([*names, "label"]) + "\n").encode())
        for start in range(0, rows, CHUNK):
            x = rng.normal(size=(min(CHUNK, rows - start), FEATURES)).astype(np.float32)
            label = np.array(["a", "b", "c"])[(x @ projection).argmax(axis=1)]
            arrays = [pa.array(x[:, j]) for j in range(FEATURES)] + [pa.array(label)]
            table = pa.Table.from_arrays(arrays, names=[*names, "label"])
            pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--stream-rows", type=int, default=0, help="also train --stream on this many")
    args = p.parse_args()
    print(f"machine: {cpu_name()}; {args.rows:,} rows x {FEATURES} float32 features + label")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "train.csv"
        generate(data, args.rows)
        print(
            f"CSV {data.stat().st_size / 1e6:.0f} MB; X float64 {args.rows * FEATURES * 8 / 1e6:.0f} MB"
        )
        results = {}
        for name, code in LOAD.items():
            best = min(run([sys.executable, "-c", code.format(p=str(data))], tmp / "l.log")
                       for _ in range(2))  # fmt: skip
            results[name] = best
            print(f"load {name:<16} {best[0]:6.2f} s  peak RSS {best[1]:7.0f} MB")
        pandas_s = results["pandas"][0]
        for name in ("bnserve float64", "bnserve float32"):
            print(f"  {name} speed / pandas: {pandas_s / results[name][0]:.2f}x")
        for rows in (args.rows, args.stream_rows):
            if not rows:
                continue
            path = data
            if rows != args.rows:
                path = tmp / "stream.csv"
                generate(path, rows, seed=1)
            command = [sys.executable, "-m", "bnserve", "train", str(path), "--stream", "--out",
                       str(tmp / f"run{rows}"), "--epochs", "1", "--hidden", "32,32", "--quiet"]  # fmt: skip
            seconds, peak = run(command, tmp / "t.log")
            print(
                f"train --stream {rows:>10,} rows, 1 epoch: {seconds:7.1f} s, peak RSS {peak:.0f} MB"
            )


if __name__ == "__main__":
    main()
