"""A local stand-in for the few Hugging Face Hub endpoints that `HfApi.create_repo` and
`HfApi.create_commit` call, on 127.0.0.1 (tests point HF_ENDPOINT or `constants.ENDPOINT` at it):

    POST /api/repos/create                              {name, organization, type, visibility}
    POST /api/validate-yaml                             a README's metadata (always accepted here)
    POST /api/{models,datasets}/<repo>/preupload/<rev>  every file answered "regular"
    POST /api/{models,datasets}/<repo>/commit/<rev>     NDJSON: a header line, then one line per file

Because every file is answered "regular", huggingface_hub sends each file's bytes inline (base64) in
the commit body, so no LFS or Xet transfer endpoint is needed. Every request is recorded (method,
path, Authorization header) and every committed file kept, so a test can assert what arrived.
Anything else gets a 404 naming the path, which makes a new call by huggingface_hub show up at once.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_REPO_CALL = re.compile(r"^/api/(models|datasets)/(.+)/(preupload|commit)/([^/]+)$")


@dataclass
class HubRecord:
    requests: list[dict] = field(default_factory=list)  # {method, path, authorization}
    repos: dict[str, dict] = field(default_factory=dict)  # "<type>/<repo>" -> {private, files, commits}
    unknown: list[str] = field(default_factory=list)


def _handler(record: HubRecord, base_url: list[str]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet test output
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            record.requests.append({"method": "GET", "path": self.path,
                                    "authorization": self.headers.get("Authorization")})
            record.unknown.append(f"GET {self.path}")
            self._send(404, {"error": f"the local hub stand-in does not serve GET {self.path}"})

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?")[0]
            record.requests.append({"method": "POST", "path": path,
                                    "authorization": self.headers.get("Authorization")})
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                kind = payload.get("type") or "model"
                key = f"{kind}/{repo}"
                if key in record.repos:
                    return self._send(409, {"error": "You already created this repo", "url": ""})
                record.repos[key] = {"visibility": payload.get("visibility"), "files": {}, "commits": []}
                prefix = "" if kind == "model" else f"/{kind}s"
                return self._send(200, {"url": f"{base_url[0]}{prefix}/{repo}", "name": repo})
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            match = _REPO_CALL.match(path)
            if match:
                kind, repo, call, revision = match.group(1)[:-1], match.group(2), match.group(3), match.group(4)
                key = f"{kind}/{repo}"
                if key not in record.repos:
                    return self._send(404, {"error": f"Repository not found: {key}"})
                if call == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False, "oid": None} for f in files]})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                for item in lines:
                    if item["key"] == "file":
                        value = item["value"]
                        content = value["content"]
                        data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                        record.repos[key]["files"][value["path"]] = data
                    elif item["key"] != "header":
                        record.unknown.append(f"commit line {item['key']}")
                oid = f"{len(record.repos[key]['commits']) + 1:040x}"
                record.repos[key]["commits"].append({"summary": header.get("summary"), "revision": revision})
                prefix = "" if kind == "model" else f"/{kind}s"
                return self._send(200, {"commitUrl": f"{base_url[0]}{prefix}/{repo}/commit/{oid}",
                                        "commitOid": oid, "pullRequestUrl": None})
            record.unknown.append(f"POST {path}")
            return self._send(404, {"error": f"the local hub stand-in does not serve POST {path}"})

    return Handler


class HubServer:
    """`with HubServer() as hub:` a threaded server on a free port; `hub.url`, `hub.record`."""

    def __init__(self):
        self.record = HubRecord()
        self._base: list[str] = [""]
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.record, self._base))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._base[0] = self.url
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
