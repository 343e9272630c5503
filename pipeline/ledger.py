"""Resumable request ledger: every expensive call's outcome, recorded durably by key.

A key is a hash of what determines the answer (model identity, template version, messages,
sampling parameters) and nothing else: batch size and concurrency never enter it, so a rerun
with other settings still finds its paid-for results.

Storage is an append-only JSON-lines file, one record per completed call, flushed to the OS
before the next outcome is accepted (so a killed process loses nothing written) and fsynced at
least once a second and on close (so a power cut loses at most the last second). A kill -9 can
tear only the last line; reading tolerates that (the torn record is dropped and the file truncated to the last whole line), so that call is
simply made again. Later records win: a success after a failure clears it.
A damaged whole line elsewhere (not JSON, not UTF-8, not a record) is skipped and left in
place; the records around it still count.

A record written for a paid model carries `billed_to` (the model's name in the recipe): its
usage, a success's or a rejected answer's (`raw`), is what that call cost, so the spend of every
run so far can be read back (`Ledger.billed`, `billed_tokens`) and a budget covers them all.

Several shards of a stage each append to their own file, and every shard reads all of them,
so a stage re-sharded between runs still never pays twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

LEDGER_VERSION = 1


FSYNC_EVERY_S = 1.0


def request_key(identity: dict, template_version: str, messages, params: dict) -> str:
    """Hash of everything that decides a response. Keep batch size/concurrency out of `params`."""
    payload = {
        "v": LEDGER_VERSION,
        "identity": identity,
        "template": template_version,
        "messages": list(messages),
        "params": params,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _short(key: str) -> bytes | str:
    """A key as the index holds it: the 32 bytes of a sha256 hex digest (what request_key makes),
    else the string itself."""
    if len(key) == 64:
        try:
            return bytes.fromhex(key)
        except ValueError:
            pass
    return key


# Bit widths of the packed index entry: file number, byte offset (16 TiB), line length, tokens.
_WIDTHS = (16, 44, 32, 32, 32)
_TOKENS_MAX = (1 << 32) - 1


def _pack(*fields: int) -> int:
    packed, shift = 0, 0
    for value, width in zip(fields, _WIDTHS):
        if not 0 <= value < 1 << width:
            raise ValueError(f"ledger index field {value} out of range")
        packed |= value << shift
        shift += width
    return packed


def _unpack(packed: int) -> tuple[int, int, int, int, int]:
    out = []
    for width in _WIDTHS:
        out.append(packed & ((1 << width) - 1))
        packed >>= width
    return tuple(out)


def _is_record(rec) -> bool:
    """A line we wrote: a key, a known status, and a result when it is a success."""
    return (isinstance(rec, dict) and isinstance(rec.get("key"), str)
            and (rec.get("status") == "failed" or (rec.get("status") == "ok" and "result" in rec)))


def _read_records(path: Path, repair: bool) -> Iterator[tuple[dict, int, int]]:
    """(record, byte offset, byte length) of each good line; repairs a torn tail when asked."""
    if not path.is_file():
        return
    data = path.read_bytes()
    good_end, start = 0, 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end == -1:  # torn tail: no newline, the write did not finish
            break
        line = data[start:end]
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:  # JSONDecodeError, or bytes that are not UTF-8 (UnicodeDecodeError)
                rec = None
            if _is_record(rec):
                yield rec, start, end - start
            # else a damaged whole line: skipped, its call is simply made again
        good_end = end + 1
        start = end + 1
    if repair and good_end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
            handle.flush()
            os.fsync(handle.fileno())


def outcomes(paths: Iterable[Path]) -> tuple[set[str], dict[str, dict]]:
    """(keys that succeeded, failure record by key) over ledger files, read only and with the
    Ledger's rules (a success anywhere clears a failure): what `rlhf status` reports."""
    ok: set[str] = set()
    failed: dict[str, dict] = {}
    for path in paths:
        for rec, _, _ in _read_records(Path(path), repair=False):
            if rec["status"] == "ok":
                ok.add(rec["key"])
                failed.pop(rec["key"], None)
            elif rec["key"] not in ok:
                failed[rec["key"]] = rec
    return ok, failed


def _bill(rec: dict) -> tuple[str, int, int] | None:
    """(billed_to, prompt tokens, completion tokens) of a paid call's record, else None."""
    name = rec.get("billed_to")
    if not isinstance(name, str):
        return None
    usage = rec.get("result") if rec["status"] == "ok" else rec.get("raw")
    if not isinstance(usage, dict):
        return (name, 0, 0)  # failed without an answer: nothing billed
    return (name, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def billed_tokens(paths: Iterable[Path]) -> dict[str, dict[str, int]]:
    """Per `billed_to`: {calls, prompt, completion} over ledger files, read only (--dry-run)."""
    out: dict[str, dict[str, int]] = {}
    for path in paths:
        for rec, _, _ in _read_records(Path(path), repair=False):
            _add_bill(out, rec)
    return out


def _add_bill(into: dict, rec: dict) -> None:
    bill = _bill(rec)
    if bill is not None:
        entry = into.setdefault(bill[0], {"calls": 0, "prompt": 0, "completion": 0})
        if (rec.get("result") if rec["status"] == "ok" else rec.get("raw")) is not None:
            entry["calls"] += 1
        entry["prompt"] += bill[1]
        entry["completion"] += bill[2]


class Ledger:
    """Outcomes by key, from `path` (written) and `also_read` (other shards' files, read only).

    Memory stays small however long the run: a success is held as where its line is (file,
    offset, length) plus its token counts, packed into one int under the key's 32 digest bytes
    (about 150 bytes a success, where a tuple under the hex string took 350), and its result is
    read back from disk when asked for; only failures (few, and needed with their reasons) are
    held whole.
    """

    def __init__(self, path: Path, also_read: Iterable[Path] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ok: dict[bytes | str, int] = {}  # _packed(file no., offset, length, tokens in, tokens out)
        self._failed: dict[str, dict] = {}
        self._billed: dict[str, dict[str, int]] = {}
        self._files: list = []
        for other in also_read:
            if Path(other) != self.path and Path(other).is_file():
                self._load(Path(other), repair=False)
        self._load(self.path, repair=True)
        self._handle = open(self.path, "ab")
        self._own = len(self._files)
        self._files.append(open(self.path, "rb"))
        self._size = self._handle.tell()
        self._synced = 0.0

    def _load(self, path: Path, repair: bool) -> None:
        number = len(self._files)
        for rec, offset, length in _read_records(path, repair):
            self._apply(rec, number, offset, length)
        if path != self.path:
            self._files.append(open(path, "rb"))

    def _apply(self, rec: dict, number: int, offset: int, length: int) -> None:
        key = rec["key"]
        _add_bill(self._billed, rec)
        if rec["status"] == "ok":
            result = rec["result"]
            tokens = (result.get("prompt_tokens", 0), result.get("completion_tokens", 0)) \
                if isinstance(result, dict) else (0, 0)
            self._ok[_short(key)] = _pack(number, offset, length, *(min(max(int(t or 0), 0), _TOKENS_MAX) for t in tokens))
            self._failed.pop(key, None)
        elif _short(key) not in self._ok:  # a recorded success is never undone by a later failure
            self._failed[key] = rec

    def _append(self, rec: dict) -> None:
        # flush() hands the line to the OS at once, which is all a killed process needs; fsync
        # (against power loss) costs milliseconds, so it runs at most every FSYNC_EVERY_S.
        line = json.dumps(rec, ensure_ascii=False).encode("utf-8")
        self._handle.write(line + b"\n")
        self._handle.flush()
        now = time.monotonic()
        if now - self._synced >= FSYNC_EVERY_S:
            os.fsync(self._handle.fileno())
            self._synced = now
        self._apply(rec, self._own, self._size, len(line))
        self._size += len(line) + 1

    def record_ok(self, key: str, result: dict, **meta) -> None:
        self._append({"key": key, "status": "ok", "time": time.time(), "result": result, **meta})

    def record_failure(self, key: str, reason: str, **meta) -> None:
        self._append({"key": key, "status": "failed", "time": time.time(), "reason": reason, **meta})

    def result(self, key: str) -> dict | None:
        where = self._ok.get(_short(key))
        if where is None:
            return None
        number, offset, length, _, _ = _unpack(where)
        return json.loads(os.pread(self._files[number].fileno(), length, offset))["result"]

    def token_counts(self) -> Iterator[tuple[int, int]]:
        """(prompt tokens, completion tokens) of every success (all runs, re-asks included)."""
        return (_unpack(entry)[3:] for entry in self._ok.values())

    def billed(self, name: str) -> dict[str, int]:
        """{calls, prompt, completion}: what the ledger's files record as paid for model `name`."""
        return dict(self._billed.get(name) or {"calls": 0, "prompt": 0, "completion": 0})

    def is_ok(self, key: str) -> bool:
        return _short(key) in self._ok

    def failure(self, key: str) -> dict | None:
        return self._failed.get(key)

    @property
    def failed_keys(self) -> set[str]:
        return set(self._failed)

    def __len__(self) -> int:
        return len(self._ok)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        for handle in self._files:
            handle.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
