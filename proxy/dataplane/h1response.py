"""A structured response (status, header fields, data, trailers: what an HTTP/2 upstream gives) formatted
for an HTTP/1.x client.

Design rule: the same framing rules as an HTTP/1 upstream's response gets (proxy.dataplane.upstream):
no body for HEAD, 204 and 304; Content-Length when the upstream gave one, else chunked to HTTP/1.1 and
close-delimited to HTTP/1.0; `Connection: close` when the connection ends after it; the proxy's own lines
from PlaneState.response_lines. Trailers go out only in a chunked response to a client that said
`TE: trailers` (which is then always chunked); every other client gets none, as RFC 9110 6.5 allows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxy.dataplane.headers import STATUS_LINES, status_line

if TYPE_CHECKING:
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.plane import PlaneState

# How the body goes out.
NONE: Final = 0
RAW: Final = 1
CHUNKED: Final = 2

_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


def head(dp: PlaneState, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, int]:
    """The status line and header block for ex, and the body mode the data then goes out in."""
    parts = [STATUS_LINES.get(status) or status_line(status)]
    cl: bytes | None = None
    for n, v in headers:
        if n == b"content-length":
            cl = v
        else:
            parts.append(b"%b: %b\r\n" % (n, v))
    # An upgrade the upstream could not take (HTTP/2 has none) left the client's parser stopped at it, and an
    # answer before the request body ended leaves unread body bytes: both close after.
    close = ex.close_after or not ex.keep_alive or dp.stopping or not ex.request_complete or ex.upgrade
    if ex.head or status == 204 or status == 304:
        mode = NONE
        if cl is not None and status != 204:
            parts.extend((b"Content-Length: ", cl, _CRLF))
    elif ex.http11 and (cl is None or ex.te_trailers):
        mode = CHUNKED
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif cl is not None:
        mode = RAW
        parts.extend((b"Content-Length: ", cl, _CRLF))
    else:
        mode = RAW
        close = True
    if close:
        ex.close_after = True
        parts.append(b"Connection: close\r\n")
    elif not ex.http11:
        parts.append(b"Connection: keep-alive\r\n")
    dp.response_lines(ex, parts)
    parts.append(_CRLF)
    return b"".join(parts), mode


def data(mode: int, chunk: bytes) -> bytes:
    if mode == CHUNKED:
        return b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunk else b""
    return chunk if mode == RAW else b""


def end(mode: int, ex: Exchange, trailers: list[tuple[bytes, bytes]]) -> bytes:
    if mode != CHUNKED:
        return b""
    if trailers and ex.te_trailers:
        return b"".join([b"0\r\n", *[b"%b: %b\r\n" % (n, v) for n, v in trailers], _CRLF])
    return _LAST_CHUNK


def unframe(frame: bytes, chunked: bool) -> bytes:
    """A request body frame as ClientFlow buffers it (chunk-framed for a chunked request) -> its data; the
    last chunk gives b"" (the request's end reaches a structured upstream through expect_response)."""
    if not chunked:
        return frame
    i = frame.find(b"\r\n")
    return frame[i + 2:-2] if i > 0 else b""
