"""HTTP/1.x requests written byte by byte over a socket, for what an HTTP library refuses to send.

`raw_request` sends exactly the bytes given (a request line, headers, a body: any of them may be
malformed) and reads the answer with the standard library's response parser, which handles
Content-Length and chunked bodies. `http_bytes` assembles a request from parts without checking
them, adding only `connection: close` (so that the answer ends with the connection) and a
Content-Length that matches the body unless told otherwise.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        return values[0] if values else None

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise AssertionError(f"not JSON ({self.status}): {self.body[:500]!r}") from error


def http_bytes(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    *,
    version: bytes = b"HTTP/1.1",
    content_length: bool = True,
) -> bytes:
    lines = [method + b" " + target + b" " + version, b"host: gateway", b"connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if content_length and (body or method in (b"POST", b"PUT", b"PATCH")):
        lines.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def raw_request(port: int, request: bytes, *, timeout_s: float = TIMEOUT_S) -> RawResponse:
    """Sends `request` to 127.0.0.1:`port` as it is and reads one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock, method=_method_of(request))
        try:
            response.begin()
            body = response.read()
        finally:
            response.close()
    return RawResponse(response.status, tuple(response.getheaders()), body)


def _method_of(request: bytes) -> str:
    # The parser needs it only to know that a HEAD answer has no body.
    return request.split(b" ", 1)[0].decode("latin-1")
