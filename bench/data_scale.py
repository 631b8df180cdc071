"""Batch prediction at data scale: `bnserve predict` end to end against a plain pandas +
onnxruntime script doing the same work (read the file, run the model on every row, write a CSV of
label, class index and probabilities), on generated float CSV and Parquet files.

First the CSV readers alone on a smaller file (pandas' C parser, pyarrow, np.loadtxt), then, for
each row count, both commands as subprocesses, alternating, each timed end to end (start-up
included) with its peak RSS (ru_maxrss from os.wait4 in a small launcher process). The model is a folded random checkpoint
(50-128-128-10, converted by `bnserve convert`'s code; speed does not depend on trained values).
The Parquet files are written the way pyarrow and pandas write them by default (row groups of up
to 1Mi rows, dictionary encoding tried, snappy). The outputs of both commands are compared on a
sample of rows.

    python bench/data_scale.py [--rows 1000000,4000000] [--repeat 2] [--reader-rows 200000]
        [--chunk-rows N] [--dir FOLDER]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bnserve.converter.convert import convert_checkpoint
from bnserve.models.checkpoint import save_checkpoint
from bnserve.service.columnar import stack_columns

LAYERS = (50, 128, 128, 10)
GENERATE_ROWS = 1 << 20  # rows generated (and, in Parquet, row-group rows) at a time

# The plain script: what a user would write with pandas and onnxruntime's defaults.
PLAIN = """
import sys
import numpy as np
import onnxruntime as ort
import pandas as pd

model, data, out = sys.argv[1:4]
df = pd.read_parquet(data) if data.endswith(".parquet") else pd.read_csv(data)
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
labels = [str(c) for c in __import__("json").loads(meta["bnserve.labels"])]
features = __import__("json").loads(meta["bnserve.feature_names"])
x = df[features].to_numpy(dtype=np.float32)
(probs,) = session.run(["probabilities"], {session.get_inputs()[0].name: x})
best = probs.argmax(axis=1)
result = pd.DataFrame(probs, columns=[f"p_{label}" for label in labels])
result.insert(0, "class_index", best)
result.insert(0, "label", np.array(labels, dtype=object)[best])
result.to_csv(out, index=False)
"""


def _fold_speed():
    """bench/fold_speed.py's random checkpoint (random He-init weights and BN statistics)."""
    spec = importlib.util.spec_from_file_location(
        "fold_speed", Path(__file__).with_name("fold_speed.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(folder: Path) -> Path:
    save_checkpoint(_fold_speed().random_checkpoint(LAYERS), folder / "checkpoint.npz")
    convert_checkpoint(folder / "checkpoint.npz", folder / "model.onnx")
    return folder / "model.onnx"


def generate(folder: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """`rows` x 50 normal float32 values as CSV (shortest round-trip text, a plain header) and as
    Parquet (pyarrow's default writer options)."""
    names = [f"x{j}" for j in range(LAYERS[0])]
    schema = pa.schema([(n, pa.float32()) for n in names])
    csv_path, parquet_path = folder / f"data_{rows}.csv", folder / f"data_{rows}.parquet"
    rng = np.random.default_rng(seed)
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with open(csv_path, "wb") as csv_file, pq.ParquetWriter(parquet_path, schema) as parquet:
        csv_file.write((",".join(names) + "\n").encode())
        for start in range(0, rows, GENERATE_ROWS):
            x = rng.normal(size=(min(GENERATE_ROWS, rows - start), len(names)))
            table = pa.Table.from_arrays(
                [pa.array(x[:, j].astype(np.float32)) for j in range(len(names))], schema=schema
            )
            pacsv.write_csv(table, csv_file, options)
            parquet.write_table(table)
    return csv_path, parquet_path


# Runs a command and writes its peak RSS (KiB) to a file. A small process of its own forks the
# command: on Linux a child's ru_maxrss counts the memory of the process it was forked from
# before its exec, and this benchmark's own process holds generated data.
MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(command: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command; fails loudly on a non-zero exit."""
    peak = log.with_suffix(".rss")
    with open(log, "wb") as err:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(peak), *command],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()}")
    return seconds, int(peak.read_text()) / 1024


def compare_outputs(ours: Path, plain: Path, rows: int = 20000) -> None:
    a, b = pd.read_csv(ours, nrows=rows), pd.read_csv(plain, nrows=rows)
    assert list(a.columns) == list(b.columns), (a.columns, b.columns)
    assert (a["class_index"] == b["class_index"]).all()
    np.testing.assert_allclose(a.iloc[:, 2:].to_numpy(), b.iloc[:, 2:].to_numpy(), atol=1e-6)


def readers(folder: Path, rows: int, repeat: int) -> None:
    """The CSV parsers alone on `rows` x 50: each to a float32 [rows, 50] array, best of runs."""
    path, _ = generate(folder, rows, seed=1)
    size = path.stat().st_size / 1e6
    names = [f"x{j}" for j in range(LAYERS[0])]
    types = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.float32()))

    def arrow(threads: bool) -> np.ndarray:  # filled column by column as bnserve does
        read = pacsv.ReadOptions(use_threads=threads)
        table = pacsv.read_csv(path, read_options=read, convert_options=types)
        return stack_columns(table.columns, table.num_rows, np.dtype(np.float32))

    candidates = {
        "pyarrow.csv.read_csv (threads, float32)": lambda: arrow(True),
        "pyarrow.csv.read_csv (1 thread, float32)": lambda: arrow(False),
        "pandas.read_csv (C parser)": lambda: pd.read_csv(path).to_numpy(np.float32),
        "pandas.read_csv (C parser, dtype float32)": lambda: pd.read_csv(
            path, dtype=np.float32
        ).to_numpy(),
        "pandas.read_csv (engine='pyarrow')": lambda: pd.read_csv(path, engine="pyarrow").to_numpy(
            np.float32
        ),
        "np.loadtxt (float32)": lambda: np.loadtxt(
            path, delimiter=",", skiprows=1, dtype=np.float32
        ),
    }
    print(f"\nCSV readers, {rows:,} x {LAYERS[0]} ({size:.0f} MB), best of {repeat}:\n")
    print("| reader | seconds | rows/s | MB/s |")
    print("|---|---:|---:|---:|")
    for name, read in candidates.items():
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            x = read()
            best = min(best, time.perf_counter() - start)
        assert x.shape == (rows, LAYERS[0])
        print(f"| {name} | {best:.2f} | {rows / best:,.0f} | {size / best:,.0f} |")
    path.unlink()
    path.with_suffix(".parquet").unlink()


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rows", default="1000000,4000000", help="row counts, comma-separated ('': readers only)"
    )
    ap.add_argument("--repeat", type=int, default=2, help="runs of each command (best kept)")
    ap.add_argument("--reader-rows", type=int, default=200000, help="0: skip the readers")
    ap.add_argument("--chunk-rows", type=int, default=None, help="passed to bnserve predict")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp one)")
    args = ap.parse_args()
    print(
        f"{cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"pyarrow {pa.__version__}, pandas {pd.__version__}, onnxruntime {ort.__version__}, "
        f"numpy {np.__version__}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        if args.reader_rows:
            readers(folder, args.reader_rows, args.repeat)
        model = build_model(folder)
        plain = folder / "plain.py"
        plain.write_text(PLAIN)
        extra = ["--chunk-rows", str(args.chunk_rows)] if args.chunk_rows else []
        print(
            f"\n`bnserve predict` vs pandas + onnxruntime, {LAYERS[0]} float features, model "
            f"{'-'.join(map(str, LAYERS))}, output CSV; wall seconds end to end, best of "
            f"{args.repeat}; peak RSS the highest of the runs\n"
        )
        print(
            "| input | rows | size MB | bnserve s | bnserve rows/s | plain s | plain rows/s "
            "| bnserve/plain | bnserve peak RSS MB | plain peak RSS MB |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for rows in (int(r) for r in args.rows.split(",") if r):
            for data in generate(folder, rows):
                ours_out, plain_out = folder / "ours.csv", folder / "plain.csv"
                ours_cmd = [sys.executable, "-m", "bnserve", "predict", str(model), str(data)]
                ours_cmd += ["-o", str(ours_out), *extra]
                plain_cmd = [sys.executable, str(plain), str(model), str(data), str(plain_out)]
                ours, theirs = [], []
                for _ in range(args.repeat):
                    ours.append(run(ours_cmd, folder / "ours.log"))
                    theirs.append(run(plain_cmd, folder / "plain.log"))
                compare_outputs(ours_out, plain_out)
                t_ours, t_plain = min(t for t, _ in ours), min(t for t, _ in theirs)
                rss_ours, rss_plain = max(m for _, m in ours), max(m for _, m in theirs)
                print(
                    f"| {data.suffix[1:]} | {rows:,} | {data.stat().st_size / 1e6:,.0f} "
                    f"| {t_ours:.1f} | {rows / t_ours:,.0f} | {t_plain:.1f} | {rows / t_plain:,.0f} "
                    f"| {t_plain / t_ours:.2f}x | {rss_ours:,.0f} | {rss_plain:,.0f} |",
                    flush=True,
                )
                data.unlink()


if __name__ == "__main__":
    main()
