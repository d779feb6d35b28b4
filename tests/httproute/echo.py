"""A local upstream that answers like the Gateway API conformance suite's echo backend (echo-basic): a JSON
body with the request's path (as sent, with its query), host, method and headers, and the backend's name.
`?delay=1s` waits before answering; `X-Echo-Set-Header: Name:value,Other:value` sets response headers;
`?responseCode=500&succeedAfter=2&uuid=U` answers 500 to the first two requests of U, then 200 (the
suite's retry simulation).

Design rule: standard library only, one thread per connection (ThreadingHTTPServer), HTTP/1.1 keep-alive
like the real echo server; every request is also recorded so a test can see the copies a mirror sent.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def go_duration(text: str) -> float:
    return sum(float(n) * _UNITS[u] for n, u in re.findall(r"([0-9.]+)(ms|s|m)", text))


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of mirrored copies (a fresh connection each) would
    # overflow it and be refused.
    request_queue_size = 256
    daemon_threads = True


class Echo:
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        echo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Head and body are two writes: without TCP_NODELAY, Nagle and the peer's delayed ACK add 40 ms.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                headers: dict[str, list[str]] = {}
                for k, v in self.headers.items():
                    headers.setdefault(k.title(), []).append(v)
                seen = {"path": self.path, "host": self.headers.get("Host", ""), "method": self.command,
                        "headers": headers, "namespace": "gateway-conformance-infra", "pod": f"{echo.name}-pod",
                        "backend": echo.name, "body": body.decode("latin-1")}
                with echo._lock:
                    echo.requests.append(seen)
                query = parse_qs(urlsplit(self.path).query)
                delay = query.get("delay")
                if delay:
                    time.sleep(go_duration(delay[0]))
                status = 200
                if "uuid" in query and "responseCode" in query:
                    with echo._lock:
                        n = echo._attempts[query["uuid"][0]] = echo._attempts.get(query["uuid"][0], 0) + 1
                    if n <= int(query.get("succeedAfter", ["0"])[0]):
                        status = int(query["responseCode"][0])
                out = json.dumps(seen).encode()
                self.send_response(status)
                for item in self.headers.get("X-Echo-Set-Header", "").split(","):
                    name, sep, value = item.partition(":")
                    if sep and name.strip():
                        self.send_header(name.strip(), value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_one

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"echo-{name}", daemon=True)

    def start(self) -> Echo:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seen(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["path"] == path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
