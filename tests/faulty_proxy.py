"""A network fault between a client and a real `mlflow server`: an HTTP proxy (a thread of the
test) that forwards every request and can lose an answer after the server has acted on the
request, hold answers back, or play a server that is away. It also notes every request it
gets, so a test can tell what was sent where."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class FaultyProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str | None):
        """`upstream`: the server's `http://host:port` (None: a server that is always away)."""
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = upstream.removeprefix("http://") if upstream else None
        self.lose_answers = 0  # answers to log-batch requests still to lose
        self.away_once_lost = False  # after losing an answer, be away until told otherwise
        self.away = upstream is None
        self.answer_delay = 0.0  # seconds each log-batch answer is held back
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultyProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        proxy = self.server
        proxy.requests.append((self.command, self.path, self.headers.get("Authorization")))
        if proxy.away:
            self._answer(503, [], b"away")
            return
        status, headers, data = self._ask_upstream(body)
        if "/runs/log-batch" in self.path:
            time.sleep(proxy.answer_delay)
            if proxy.lose_answers > 0:  # the server has stored the batch; its answer is lost
                proxy.lose_answers -= 1
                proxy.away = proxy.away_once_lost
                self.close_connection = True
                return
        self._answer(status, headers, data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def _ask_upstream(self, body: bytes):
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(self.command, self.path, body, headers)
            response = upstream.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            upstream.close()

    def _answer(self, status: int, headers, data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in _HOP_BY_HOP | {"date", "server"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet
        pass
