"""OpenAI-compatible servers we did not write, started on this machine for the demo and the tests.

`transformers_serve(model_dir, work_dir)` runs `transformers serve` (the `transformers[serving]`
extra) pinned to one local model folder, waits until it answers, and stops it on exit. Such a
server loads a model by the path a request names, so a recipe's entry for it names the same
folder as its `model` (a stage reference works: `model: {stage: real-models, output:
smollm2-135m}`, resolved to the absolute path the server was started with).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class ServerFailed(RuntimeError):
    """The server exited, or did not answer in time; the message holds its log's tail."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def transformers_serve(model_dir: str | Path, work_dir: str | Path, *, url_file: str | Path | None = None,
                       start_timeout_s: float = 300.0, threads: int | None = None) -> Iterator[str]:
    """Serve `model_dir` with `transformers serve` on a free local port; yields the base URL
    (`http://127.0.0.1:PORT/v1`), also written to `url_file` while the server is up."""
    model_dir = Path(model_dir).resolve()
    work = Path(work_dir)
    hub_cache = work / "hf-hub-cache"  # transformers serve answers 500 on /v1/models without one
    hub_cache.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log_path = work / f"transformers-serve-{port}.log"
    exe = Path(sys.executable).with_name("transformers")
    command = [str(exe) if exe.is_file() else "transformers", "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    if shutil.which(command[0]) is None and not Path(command[0]).is_file():
        raise ServerFailed("`transformers serve` is not installed (pip install 'transformers[serving]'; "
                           "`make install` does)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    base_url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _answers(f"http://127.0.0.1:{port}/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise ServerFailed(f"transformers serve {model_dir} did not start (exit code {process.poll()}; "
                                   f"log {log_path}):\n{tail}")
            time.sleep(0.25)
        if url_file:
            Path(url_file).parent.mkdir(parents=True, exist_ok=True)
            Path(url_file).write_text(base_url + "\n")
        yield base_url
    finally:
        if url_file and Path(url_file).is_file() and Path(url_file).read_text().strip() == base_url:
            Path(url_file).unlink()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.launch.local_servers MODEL_DIR [--url-file F]`: serve in the foreground."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m pipeline.launch.local_servers",
                                     description="transformers serve on a local model folder, until Ctrl-C")
    parser.add_argument("model_dir")
    parser.add_argument("--url-file", help="write the base URL here while the server is up")
    args = parser.parse_args(argv)
    if not (Path(args.model_dir) / "config.json").is_file():
        print(f"error: {args.model_dir} is not a model folder (no config.json); `make real-models` makes one",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, transformers_serve(args.model_dir, tmp, url_file=args.url_file) as url:
        print(f"transformers serve: {args.model_dir} at {url} (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
