"""Rows streamed to disk as a stage produces them, then gathered into one `datasets` folder.

A stage that makes rows one at a time (annotate: a row is done when its last judge answer is
in) hands each to a `RowWriter` and forgets it, so its memory does not grow with the run. The
writer buffers a few rows (at most `batch_rows`, or `batch_s` seconds' worth), then appends
them as one Arrow record batch to `part-<n>.arrow` (Arrow IPC stream files, readable
while they are written) in a hidden temporary folder beside the final one; a new part starts
every `rows_per_part` rows. `commit()` renames the folder into place in one step; a process
killed before that leaves only the hidden folder, which the next writer for the same place
removes. Each row carries its position in the stage's input (column `__row__`), since rows
finish out of order.

`SpilledRows` is the other direction: a stage's input rows, kept in an unlinked temporary file
and read back by position (a few hundred decoded rows cached), so a run over 100,000 prompts
holds an offset per row instead of every row's text.

`gather()` builds the final dataset from the parts of one or more committed folders: rows in
input order, `__row__` dropped, in the folder layout `save_to_disk` writes (read back with
`datasets.load_from_disk`), through `runs.atomic_dir`. It reads the parts with plain reads, a
chunk of rows at a time, never memory-mapped: a mapped copy counts every page of the dataset
as resident memory of the process, so the merge's peak would grow with the run.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
from array import array
from pathlib import Path
from typing import Iterable

from pipeline.runs import atomic_dir

ROW = "__row__"
PART_GLOB = "part-*.arrow"


class SpilledRows:
    """A sequence of rows (dicts) kept on disk: each appended row is pickled into a temporary
    file that has no name (the OS frees it when the process ends, however it ends); `rows[i]`
    reads row i back, with the last `cache_rows` decoded rows read kept. Work goes through the
    rows nearly in order, so a cache a few times the concurrency answers almost every read. A row
    handed out is shared with the cache: read it, do not change it."""

    def __init__(self, rows: Iterable[dict] = (), cache_rows: int = 512):
        self._file = tempfile.TemporaryFile(prefix="rlhf-rows-")
        self._ends = array("q")
        self._unflushed = False
        self._cache: dict[int, dict] = {}  # in the order read
        self.cache_rows = cache_rows
        for row in rows:
            self.append(row)

    def append(self, row: dict) -> None:
        data = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
        self._file.write(data)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(data))
        self._unflushed = True

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> dict:
        row = self._cache.get(index)
        if row is not None:
            return row
        if index < 0:
            index += len(self._ends)
        if not 0 <= index < len(self._ends):
            raise IndexError(f"row {index} of {len(self._ends)}")
        if self._unflushed:
            self._file.flush()
            self._unflushed = False
        start = self._ends[index - 1] if index else 0
        row = pickle.loads(os.pread(self._file.fileno(), self._ends[index] - start, start))
        self._cache[index] = row
        if len(self._cache) > self.cache_rows:
            del self._cache[next(iter(self._cache))]  # the oldest read: the work has moved past it
        return row

    def __iter__(self):
        return (self[i] for i in range(len(self._ends)))

    def close(self) -> None:
        self._file.close()


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class RowWriter:
    def __init__(self, final: Path, features, rows_per_part: int = 10_000, batch_rows: int = 256,
                 batch_s: float = 1.0):
        from datasets import Features, Value

        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f".{self.final.name}.tmp-*"):  # from a killed run
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        self.tmp.mkdir()
        self.features = Features({**features, ROW: Value("int64")})
        self.rows_per_part, self.batch_rows, self.batch_s = rows_per_part, batch_rows, batch_s
        self._buffer: list[dict] = []
        self._flushed = time.monotonic()
        self._sink = self._writer = self._schema = None
        self._parts = 0
        self._in_part = 0
        self.rows = 0

    def write(self, index: int, row: dict) -> None:
        self._buffer.append({**row, ROW: index})
        self.rows += 1
        if len(self._buffer) >= self.batch_rows or time.monotonic() - self._flushed >= self.batch_s:
            self.flush()

    def flush(self) -> None:
        """The buffered rows, as one record batch, handed to the OS (readable from the part file)."""
        self._flushed = time.monotonic()
        if not self._buffer:
            return
        import pyarrow as pa

        if self._schema is None:
            self._schema = self.features.arrow_schema  # carries the features, for Dataset.from_file
        try:
            table = pa.Table.from_pylist(self._buffer, schema=self._schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # a value of another type than its feature (a rating 4 for "4"): cast the way a
            # whole-dataset Dataset.from_list would (slower: it fingerprints the batch)
            from datasets import Dataset

            table = Dataset.from_list(self._buffer, features=self.features).data.table
        self._buffer = []
        if self._writer is not None and self._in_part >= self.rows_per_part:
            self._close_part()
        if self._writer is None:
            self._sink = pa.OSFile(str(self.tmp / f"part-{self._parts:05d}.arrow"), "wb")
            self._writer = pa.ipc.new_stream(self._sink, table.schema)
            self._parts += 1
            self._in_part = 0
        self._writer.write_table(table)
        self._sink.flush()
        self._in_part += table.num_rows

    def _close_part(self) -> None:
        self._writer.close()
        self._sink.close()
        self._writer = self._sink = None

    def commit(self) -> None:
        self.flush()
        if self._writer is not None:
            self._close_part()
        _replace_dir(self.tmp, self.final)

    def discard(self) -> None:
        if self._writer is not None:
            self._close_part()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _batches(part: Path) -> tuple[object, list[tuple[int, "np.ndarray"]]]:
    """A part's schema and, for each record batch, its byte offset and row positions. Read
    with plain reads, not a memory map, so the pages read are not counted in this process's
    memory once each batch is dropped."""
    import pyarrow as pa

    out = []
    with pa.OSFile(str(part), memory_pool=pa.system_memory_pool()) as source:
        schema = pa.ipc.read_schema(pa.ipc.read_message(source))
        while True:
            offset = source.tell()
            try:
                message = pa.ipc.read_message(source)
            except EOFError:
                break
            batch = pa.ipc.read_record_batch(message, schema)
            # a copy: a view would keep the whole message body (every column) alive
            out.append((offset, batch.column(ROW).to_numpy().copy()))
    return schema, out


class _BatchCache:
    """Record batches read back by (part, byte offset), the last `size` of them kept: rows
    finish nearly in input order, so a gathered chunk needs few batches, mostly the same ones
    as the chunk before. Read into the system allocator's memory, which returns freed batches
    to the OS; Arrow's default pool keeps tens of MiB of them mapped."""

    def __init__(self, parts: list[Path], schemas: list, size: int = 4):
        import pyarrow as pa

        self.files = [pa.OSFile(str(p), memory_pool=pa.system_memory_pool()) for p in parts]
        self.schemas, self.size = schemas, size
        self.kept: dict[tuple[int, int], object] = {}

    def get(self, part: int, offset: int):
        import pyarrow as pa

        key = (part, offset)
        batch = self.kept.pop(key, None)
        if batch is None:
            self.files[part].seek(offset)
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(self.files[part]), self.schemas[part])
            if len(self.kept) >= self.size:
                del self.kept[next(iter(self.kept))]
        self.kept[key] = batch  # most recently used last
        return batch

    def close(self) -> None:
        for handle in self.files:
            handle.close()


def gather(folders: list[Path], final: Path, features, on_chunk=None, chunk_rows: int = 256) -> int:
    """Every row of the committed `folders` into the dataset folder `final`, in input order
    (atomically, read with `datasets.load_from_disk`); the number of rows. Refuses a row
    position seen twice. `on_chunk(table)` sees each written chunk of rows (a pyarrow Table),
    so a caller can tally them without reading the dataset again.

    Memory stays flat: a first pass reads only each record batch's positions, then the rows are
    written `chunk_rows` at a time from the few batches each chunk needs (plain reads; a
    memory-mapped copy, as `save_to_disk` makes, would count every page of the dataset as this
    process's resident memory). The folder is what `save_to_disk` writes: one Arrow stream file
    carrying the features, `dataset_info.json` and `state.json`."""
    import hashlib
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import DatasetInfo, Features

    features = Features(features)
    schema = features.arrow_schema
    parts = [p for folder in folders for p in sorted(Path(folder).glob(PART_GLOB))]
    where, positions, schemas = [], [], []  # per batch: (part, offset) and its rows' positions
    for number, part in enumerate(parts):
        part_schema, batches = _batches(part)
        schemas.append(part_schema)
        for offset, rows in batches:
            where.append((number, offset))
            positions.append(rows)
    counts = np.array([len(rows) for rows in positions], dtype=np.int64)
    positions = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
    if len(np.unique(positions)) != len(positions):
        raise ValueError(f"rows written twice among {', '.join(map(str, folders))}")
    batch_of = np.repeat(np.arange(len(counts)), counts)  # each row's batch, and its index there
    index_in_batch = np.arange(len(positions)) - np.repeat(np.cumsum(counts) - counts, counts)
    order = np.argsort(positions, kind="stable")
    cache = _BatchCache(parts, schemas)
    try:
        with atomic_dir(final) as tmp:
            tmp.mkdir(parents=True)
            data_file = tmp / "data-00000-of-00001.arrow"
            with pa.OSFile(str(data_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for start in range(0, len(order), chunk_rows):
                    rows = order[start:start + chunk_rows]
                    needed, first_row = np.unique(batch_of[rows], return_inverse=True)
                    table = pa.Table.from_batches([cache.get(*where[b]) for b in needed])
                    base = np.cumsum(counts[needed]) - counts[needed]
                    table = pc.take(table, pa.array(base[first_row] + index_in_batch[rows]),
                                    memory_pool=pa.system_memory_pool())
                    table = table.drop_columns(ROW).replace_schema_metadata(schema.metadata)
                    writer.write_table(table)
                    if on_chunk is not None:
                        on_chunk(table)
            digest = hashlib.sha256()
            with open(data_file, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
            DatasetInfo(features=features).write_to_directory(str(tmp))
            state = {"_data_files": [{"filename": data_file.name}], "_fingerprint": digest.hexdigest()[:16],
                     "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                     "_output_all_columns": False, "_split": None}
            (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    finally:
        cache.close()
    return len(order)
