"""Rows streamed to disk as a stage produces them, then gathered into one `datasets` folder.

A stage that makes rows one at a time (annotate: a row is done when its last judge answer is
in) hands each to a `RowWriter` and forgets it, so its memory does not grow with the run. The
writer buffers a few rows (at most `batch_rows`, or `batch_s` seconds' worth), then appends
them as one Arrow record batch to `part-<n>.arrow` (Arrow IPC stream files, the format
`datasets` memory-maps) in a hidden temporary folder beside the final one; a new part starts
every `rows_per_part` rows. `commit()` renames the folder into place in one step; a process
killed before that leaves only the hidden folder, which the next writer for the same place
removes. Each row carries its position in the stage's input (column `__row__`), since rows
finish out of order.

`gather()` builds the final dataset from the parts of one or more committed folders: rows in
input order, `__row__` dropped, saved with `save_to_disk` (read back with
`datasets.load_from_disk`, as before) through `runs.atomic_dir`. The parts are memory-mapped and
copied batch by batch, so that step's memory does not grow with the rows either.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pipeline.runs import atomic_dir

ROW = "__row__"
PART_GLOB = "part-*.arrow"


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


def gather(folders: list[Path], final: Path, features) -> int:
    """Every row of the committed `folders` into the dataset folder `final`, in input order
    (atomically); the number of rows. Refuses a row position seen twice."""
    import numpy as np
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(p)) for folder in folders for p in sorted(Path(folder).glob(PART_GLOB))]
    if not parts:
        with atomic_dir(final) as tmp:
            Dataset.from_list([], features=features).save_to_disk(str(tmp))
        return 0
    data = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    positions = data.data.column(ROW).to_numpy()
    order = np.argsort(positions, kind="stable")
    if len(np.unique(positions)) != len(positions):
        raise ValueError(f"rows written twice among {', '.join(map(str, folders))}")
    data = data.select(order).remove_columns(ROW)
    with atomic_dir(final) as tmp:
        data.save_to_disk(str(tmp))
    return len(data)
