"""Scoring a data set spread over many files on a Dask cluster (`bnserve predict --dask`).

The files (a folder, a glob or a single file; CSV and Parquet, by extension) are cut into pieces,
byte ranges of about `partition_bytes` of each CSV (cut at line starts) and the row groups of
each Parquet file, which become the partitions of a `dask.dataframe` (`prediction_frame`, built
with `dd.from_map`). A worker reads and scores a piece with the code `bnserve predict` runs in
one process (service/columnar.py, `ModelRuntime.probabilities`), so the answers are the same
numbers and errors name the file, the line (or row) and the column. Each worker process loads
the model once, on its first piece, into a cache keyed by the model's path and sha256 (checked
against the file the client hashed), and scores every later piece with that one onnxruntime
session.

`predict_dask` writes one file per partition into the folder OUT: `part-00000.csv`,
`part-00001.csv`, ... (Parquet parts when OUT's name ends in `.parquet`), numbered in the order
of the sorted file names and of the pieces within each file, so reading the parts in name order
gives the rows in input order. The parts are written by the workers into a temporary folder
next to OUT, renamed to OUT when every part is written: a failure leaves no OUT and keeps an
earlier one.

The model file, the data and OUT's parent folder must be at the same paths on every worker (a
shared filesystem; with `local` this machine). dask is imported only inside these functions:
install the `dask` extra (dask[dataframe,distributed]) to use them. A CSV value holding a quoted
newline is not supported here (a piece boundary could split it), as with dask.dataframe's own
read_csv.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import logging
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from bnserve.errors import DataError, ModelError, UsageError, require_extra
from bnserve.service.columnar import (
    CsvPiece,
    PredictionWriter,
    csv_chunks,
    csv_layout,
    is_parquet,
    line_boundary,
    parquet_chunks,
    parquet_file,
    prediction_schema,
    prediction_table,
    select_columns,
)
from bnserve.service.config import DEFAULT_CHUNK_ROWS, default_workers
from bnserve.service.metadata import ModelInfo
from bnserve.service.offline import csv_selection, score
from bnserve.service.runtime import ModelRuntime

#: Bytes of CSV per partition (dask.dataframe.read_csv's default block size).
DEFAULT_PARTITION_BYTES = 64 << 20
_PART_PREFIX = "part-"


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load the model: its file, its sha256 (the worker checks that it
    reads the file the client hashed), and how to run it."""

    path: str
    name: str
    version: int
    sha256: str
    device: str = "cpu"
    output_kind: str = "auto"
    threads: int = 1  # onnxruntime intra-op threads per worker process

    @classmethod
    def of(
        cls,
        path: Path,
        name: str,
        version: int,
        device: str = "cpu",
        output_kind: str = "auto",
        threads: int = 1,
    ) -> ModelRef:
        return cls(str(path), name, version, file_sha256(path), device, output_kind, threads)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# One loaded model per worker process and model: loaded on the first piece, reused after.
_RUNTIMES: dict[ModelRef, ModelRuntime] = {}
_LOADS: dict[ModelRef, int] = {}
_LOCK = threading.Lock()


def worker_runtime(model: ModelRef) -> ModelRuntime:
    """The model's runtime in this process, loaded (and its sha256 checked) once."""
    with _LOCK:
        runtime = _RUNTIMES.get(model)
        if runtime is None:
            found = file_sha256(model.path)
            if found != model.sha256:
                raise ModelError(
                    f"{model.path}: sha256 {found[:12]} here, {model.sha256[:12]} where the job "
                    "was started: the workers must see the same model file"
                )
            runtime = ModelRuntime.load(
                Path(model.path),
                model.name,
                model.version,
                model.device,
                model.threads,
                model.output_kind,
            )
            _RUNTIMES[model] = runtime
            _LOADS[model] = _LOADS.get(model, 0) + 1
        return runtime


def model_loads() -> dict[str, int]:
    """How many times this process loaded each model (`client.run(model_loads)` asks every
    worker): 1 each, however many pieces it scored."""
    return {f"{m.path}@{m.sha256[:12]}": n for m, n in _LOADS.items()}


# --- the pieces of a data set ---------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One partition: bytes [start, end) of a CSV file (first_row: 0-based index of its first
    data row, None when unknown), or some row groups of a Parquet file."""

    path: str
    start: int = 0
    end: int = 0
    first_row: int | None = 0
    row_groups: tuple[int, ...] | None = None


def data_files(data: str | Path) -> list[Path]:
    """The files of a data set: a folder's CSV and Parquet files (names starting with '.' or
    '_' left out, as Spark and Dask write markers so), the files a glob matches, or one file;
    sorted by name."""
    path = Path(data)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))]
        files = [p for p in files if is_parquet(p) or p.suffix.lower() in (".csv", ".txt")]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(data)) if Path(p).is_file()]
    if not files:
        raise DataError(f"{data}: no CSV or Parquet files (a folder, a glob or a file)")
    return sorted(files)


def plan(
    files: Sequence[Path], info: ModelInfo, partition_bytes: int = DEFAULT_PARTITION_BYTES
) -> list[Piece]:
    """Cut the files into pieces, checking on the way that every file has the model's columns
    (before any worker starts)."""
    pieces = []
    for path in files:
        if is_parquet(path):
            reader = parquet_file(path)
            select_columns(reader.schema_arrow.names, info, path)
            groups = range(reader.metadata.num_row_groups)
            pieces += [Piece(str(path), row_groups=(g,)) for g in groups]
            continue
        layout = csv_layout(path)
        csv_selection(layout, info)
        starts = range(layout.data_start, max(layout.size, layout.data_start + 1), partition_bytes)
        bounds = sorted({line_boundary(path, s, layout.data_start) for s in starts} | {layout.size})
        for i, (start, end) in enumerate(itertools.pairwise(bounds)):
            pieces.append(Piece(str(path), start, end, 0 if i == 0 else None))
    return pieces


def score_piece(
    piece: Piece,
    model: ModelRef,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    batch_size: int = 4096,
) -> pa.Table:
    """Read and score one piece on this process (the worker's cached model): its predictions
    as label, class_index, p_<label>..."""
    runtime = worker_runtime(model)
    info, path = runtime.info, Path(piece.path)
    if piece.row_groups is not None:
        selection = select_columns(parquet_file(path).schema_arrow.names, info, path)
        chunks = parquet_chunks(
            path, info, selection, chunk_rows, model.threads, row_groups=piece.row_groups
        )
    else:
        layout = csv_layout(path)
        section = CsvPiece(piece.start, piece.end, piece.first_row)
        chunks = csv_chunks(
            layout, info, csv_selection(layout, info), chunk_rows, model.threads, section
        )
    tables = [prediction_table(runtime.labels, score(runtime, x, batch_size)) for x in chunks]
    if not tables:
        return prediction_schema(runtime.labels).empty_table()
    return pa.concat_tables(tables)


def _score_partition(
    piece: Piece, model: ModelRef, chunk_rows: int, batch_size: int
) -> Any:  # a pandas DataFrame
    return score_piece(piece, model, chunk_rows, batch_size).to_pandas()


def prediction_frame(
    model: ModelRef,
    data: str | Path,
    *,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    batch_size: int = 4096,
) -> Any:
    """The predictions of every row of `data` as a lazy `dask.dataframe.DataFrame` (label,
    class_index, p_<label>...; one partition per piece, in input order), scored on the workers
    of the current Dask client. Compute it, write it, or join it as any Dask frame."""
    _require_dask()
    import dask.dataframe as dd

    runtime = _checked(model)
    pieces = plan(data_files(data), runtime.info, partition_bytes)
    meta = prediction_schema(runtime.labels).empty_table().to_pandas()
    if not pieces:  # files with a header and no rows
        return dd.from_pandas(meta, npartitions=1)
    return dd.from_map(
        _score_partition,
        pieces,
        model=model,
        chunk_rows=chunk_rows,
        batch_size=batch_size,
        meta=meta,
        enforce_metadata=False,
        label="bnserve-predict",
    )


@functools.cache
def _checked(model: ModelRef) -> ModelRuntime:
    """The model loaded where the job starts: it is checked before any worker starts, and its
    labels and columns plan the job."""
    return ModelRuntime.load(
        Path(model.path), model.name, model.version, "cpu", 1, model.output_kind
    )


def _write_part(frame: Any, path: str, labels: Sequence[object]) -> int:
    """Write one partition's predictions (on the worker that holds it); returns its rows."""
    table = pa.Table.from_pandas(frame, schema=prediction_schema(labels), preserve_index=False)
    with open(path, "wb") as f, PredictionWriter(f, labels, parquet=is_parquet(path)) as writer:
        if table.num_rows:
            writer.write_table(table)
    return table.num_rows


@dataclass(frozen=True)
class DaskResult:
    rows: int
    files: int
    parts: int
    workers: int
    out: Path


def predict_dask(
    model: ModelRef,
    data: str | Path,
    out: Path,
    scheduler: Any,
    *,
    workers: int | None = None,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    batch_size: int = 4096,
) -> DaskResult:
    """Score every file of `data` on a Dask cluster into the folder `out`, one file per
    partition. `scheduler`: an address (tcp://host:8786), `local` (a LocalCluster of `workers`
    single-threaded processes, default one per core, closed at the end) or a
    `distributed.Client` to use as it is."""
    _require_dask()
    import dask
    from dask.distributed import Client, LocalCluster

    out = _check_out(out)
    files = data_files(data)
    labels = _checked(model).labels
    suffix = ".parquet" if is_parquet(out) else ".csv"
    cluster = None
    if isinstance(scheduler, str):
        if scheduler == "local":
            cluster = LocalCluster(
                n_workers=workers or default_workers(),
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
            )
            client = Client(cluster)
            # our own workers: a failing piece is reported once, by the error this raises,
            # not also as a worker's traceback on standard error
            client.run(_quiet_worker_logs)
        else:
            client = Client(scheduler)
    else:
        client = scheduler
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        frame = prediction_frame(
            model,
            data,
            partition_bytes=partition_bytes,
            chunk_rows=chunk_rows,
            batch_size=batch_size,
        )
        tmp.mkdir()
        parts = frame.to_delayed()
        writes = [
            dask.delayed(_write_part)(part, str(tmp / f"{_PART_PREFIX}{i:05d}{suffix}"), labels)
            for i, part in enumerate(parts)
        ]
        rows = sum(client.compute(writes, sync=True))
        n_workers = len(client.scheduler_info().get("workers", {}))
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if cluster is not None:
            client.close()
            cluster.close()
    return DaskResult(rows, len(files), len(parts), n_workers, out)


def _quiet_worker_logs() -> None:
    logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)


def _require_dask() -> None:
    for module in ("dask", "dask.dataframe", "distributed"):
        require_extra(module, "dask", "predict --dask")


def _check_out(out: Path) -> Path:
    """OUT: a folder that does not exist yet or holds an earlier run's parts only."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: is a file; --dask writes a folder of parts")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: directory {out.parent} does not exist")
    if out.is_dir():
        other = [p.name for p in out.iterdir() if not p.name.startswith(_PART_PREFIX)]
        if other:
            raise UsageError(
                f"-o {out}: the folder holds other files than parts ({', '.join(other[:3])}); "
                "give a new folder"
            )
    return out


def _replace_folder(new: Path, out: Path) -> None:
    """Put the finished folder in place of `out` (an earlier run's parts are removed only
    once the new ones are complete)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
