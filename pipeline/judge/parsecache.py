"""Parsed judge answers kept beside the ledger, so that rebuilding a finished run (`--force`)
neither renders, keys nor parses its requests again.

The ledger stays the source of truth: it holds every raw answer, and this cache only says, for
one judge item, which ledger key its chain of requests ended on, after how many re-asks, and
what that answer parsed to. An entry is used only while
- the item is the same question about the same row: its cache key hashes the row as loaded,
  the template version, the judge identity and every setting that shapes a request (see
  `Requests.context`), plus the item's kind, aspect, completion and order;
- the parser is the same: each line carries `PARSER_VERSION`, and lines of another version are
  ignored, so bumping it re-parses everything from the ledger;
- the ledger still holds that final answer (a deleted ledger means "judge again").
Anything else is a miss, and the item is replayed from the ledger the slow way (and cached).

Storage: one append-only file per shard, `parsed.jsonl`, lines `<version>\\t<item key>\\t<json>`.
Opening reads only the first two fields of each line (no JSON), so the index is cheap to build;
a value is read back from disk when asked for. A torn last line (a killed process) is dropped
and the file cut back to its last whole line; a damaged line reads as a miss. Nothing here is
fsynced: a lost entry is only parsed again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from pipeline.judge import parse


class ParseCache:
    """Item key -> (final ledger key, re-asks, parsed value), from `path` (appended to) and
    `also_read` (other shards' files, read only)."""

    def __init__(self, path: Path, also_read: Iterable[Path] = (), version: int | str | None = None):
        self.path = Path(path)
        # read when opened (not when imported): the version in force is the parser's of this run
        self.prefix = f"{parse.PARSER_VERSION if version is None else version}\t".encode()
        self._index: dict[str, tuple[int, int, int]] = {}  # file number, offset, length
        self._files: list = []
        for other in also_read:
            if Path(other) != self.path and Path(other).is_file():
                self._load(Path(other), repair=False)
        self._load(self.path, repair=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "ab")
        self.hits = 0

    def _load(self, path: Path, repair: bool) -> None:
        if not path.is_file():
            return
        number = len(self._files)
        handle = open(path, "rb")
        self._files.append(handle)
        data = handle.read()
        start, prefix = 0, self.prefix
        while True:
            end = data.find(b"\n", start)
            if end == -1:
                break
            if data.startswith(prefix, start):
                tab = data.find(b"\t", start + len(prefix), end)
                if tab != -1:
                    key = data[start + len(prefix):tab].decode("ascii", "replace")
                    self._index[key] = (number, tab + 1, end - tab - 1)
            start = end + 1
        if repair and start < len(data):  # a torn last line: cut it off so the next append starts clean
            with open(path, "r+b") as out:
                out.truncate(start)

    def get(self, key: str) -> tuple[str, int, object] | None:
        where = self._index.get(key)
        if where is None:
            return None
        number, offset, length = where
        try:
            ledger_key, reasks, value = json.loads(os.pread(self._files[number].fileno(), length, offset))
        except (ValueError, TypeError):
            return None  # a damaged line: parsed again
        return ledger_key, reasks, value

    def put(self, key: str, ledger_key: str, reasks: int, value) -> None:
        """Not added to the index: within one run each item is resolved once, and later runs
        read the file. So the cache costs no memory while a long run is being judged."""
        body = json.dumps([ledger_key, reasks, value], ensure_ascii=False, separators=(",", ":"))
        self._handle.write(self.prefix + key.encode() + b"\t" + body.encode("utf-8") + b"\n")

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        for handle in self._files:
            handle.close()

    def __enter__(self) -> "ParseCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
