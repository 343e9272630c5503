"""The offline stand-in for an OpenAI-compatible LLM API and judge (NOT a real model).

    from pipeline.standin import start_standin
    with start_standin(tmp_dir, latency_s=0.01, fail_first_n=1) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="any")
        ...
        server.stats()["requests_by_status"]

`start_standin` runs `python -m pipeline.standin` as a subprocess and talks to its admin
endpoints with urllib only, so importing this package pulls in the standard library alone:
the aiohttp server (`make_app`) is loaded on first use. See `server.py` for the endpoints,
`rating.py` for the rating rule, `textgen.py` for how answers are made up, `judge.py` for how
judge prompts are answered (with the rating rule), `sayself.py` for the SaySelf rationale and
chain prompts, and `batches.py` for the Files and Batches endpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.standin.rating import rate
from pipeline.standin.settings import FLAG_FOR_FIELD, StandinSettings, check_value

__all__ = ["StandinSettings", "make_app", "rate", "start_standin", "StandinProcess", "StandinError"]

# The admin calls must reach 127.0.0.1 directly even where HTTP(S)_PROXY is set.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def __getattr__(name):
    if name == "make_app":  # lazy: aiohttp is imported only when an in-process app is wanted
        from pipeline.standin.server import make_app

        return make_app
    raise AttributeError(f"module 'pipeline.standin' has no attribute {name!r}")


class StandinError(RuntimeError):
    """The stand-in server could not be started, or refused an admin request."""


@dataclass
class StandinProcess:
    """A running stand-in server subprocess."""

    process: subprocess.Popen
    port: int
    log_path: Path
    _finalizer: weakref.finalize | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.root_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with _OPENER.open(req, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise StandinError(f"{method} {path} -> HTTP {exc.code}: {detail}") from None

    def stats(self) -> dict:
        return self._call("GET", "/standin/stats")

    def reset(self) -> dict:
        return self._call("POST", "/standin/reset", {})

    def config(self) -> dict:
        return self._call("GET", "/standin/config")

    def configure(self, **fields) -> dict:
        """Change settings at run time; returns the full settings now in force."""
        return self._call("POST", "/standin/config", fields)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in `timeout` s; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
        return self.process.returncode

    def __enter__(self) -> "StandinProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill(process: subprocess.Popen) -> None:
    # Safety net for a forgotten server (garbage-collected or interpreter exit).
    if process.poll() is None:
        process.kill()
        process.wait()


def start_standin(tmp_dir, *, start_timeout_s: float = 20.0, url_file: str | Path | None = None,
                  **settings) -> StandinProcess:
    """Start `python -m pipeline.standin --port 0` in a subprocess and wait until it listens.

    `settings` are StandinSettings fields (e.g. latency_s=0.05, fail_first_n=2); they are
    checked here, then passed as CLI flags. The server's stderr goes to
    `tmp_dir/standin-<port-file-stem>.log`. With `url_file`, the server writes its base URL
    there (for recipes with `base_url_file`) and removes it when it stops.
    """
    args = []
    for name, value in settings.items():
        value = check_value(name, value)  # an unknown name or a bad value fails here, by name
        args += [FLAG_FOR_FIELD[name], str(value)]
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    port_file = tmp / f"standin-{stamp}.port"
    log_path = tmp / f"standin-{stamp}.log"

    # Make sure the child imports this very package, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "pipeline.standin", "--host", "127.0.0.1", "--port", "0",
           "--port-file", str(port_file), *(["--url-file", str(url_file)] if url_file else []), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)

    deadline = time.monotonic() + start_timeout_s
    while True:
        if port_file.exists():
            port = int(port_file.read_text().strip())
            break
        if process.poll() is not None or time.monotonic() > deadline:
            _kill(process)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise StandinError(f"stand-in server did not start (exit code {process.returncode}):\n{tail}")
        time.sleep(0.02)
    server = StandinProcess(process=process, port=port, log_path=log_path)
    server._finalizer = weakref.finalize(server, _kill, process)
    return server
