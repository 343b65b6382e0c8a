"""`rlk2 sandbox serve`: the pool over HTTP, for hosts that cannot expose a Docker engine.

POST /run   body: JSONL jobs (the `exec` format) -> JSONL results in input order (400 + one-line error on bad input)
GET  /health -> {"ok": true, "ready_slots": N}

No authentication: it binds to loopback by default; put it behind ssh port forwarding or an authenticating
proxy to reach it from elsewhere.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sandboxes.pool import SlotPool
from sandboxes.result import JobError, read_jobs

MAX_BODY = 64 << 20


def make_handler(pool: SlotPool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/health":
                return self._reply(404, b'{"error": "not found"}')
            self._reply(200, json.dumps({"ok": pool.ready_slots() > 0, "ready_slots": pool.ready_slots()}).encode())

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/run":
                return self._reply(404, b'{"error": "not found"}')
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length <= 0 or length > MAX_BODY:
                return self._reply(400, json.dumps({"error": f"body must be 1..{MAX_BODY} bytes"}).encode())
            try:
                jobs = read_jobs(self.rfile.read(length).splitlines(), "request body line")
            except JobError as exc:
                return self._reply(400, json.dumps({"error": str(exc)}).encode())
            results = pool.run_batch(jobs)
            body = "".join(json.dumps(r.to_json()) + "\n" for r in results).encode()
            self._reply(200, body, "application/x-ndjson")

        def log_message(self, fmt: str, *args: object) -> None:
            pass  # one line per request would drown the terminal under RL load

    return Handler


def serve(pool: SlotPool, host: str = "127.0.0.1", port: int = 8377) -> None:
    server = ThreadingHTTPServer((host, port), make_handler(pool))
    print(f"serving sandboxes on http://{host}:{server.server_address[1]} (POST /run, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
