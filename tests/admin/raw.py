"""Raw HTTP/1.1 exchanges with the admin listener, for requests an HTTP client would normalise away."""

from __future__ import annotations

import asyncio


async def raw_exchange(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send `data` on a fresh connection and return what comes back until the server closes."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        w.write(data)
        await w.drain()
        async with asyncio.timeout(timeout):
            while chunk := await r.read(65536):
                out += chunk
    except (TimeoutError, ConnectionError):
        pass
    finally:
        w.transport.abort()
    return out
