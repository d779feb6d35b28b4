"""Raw-socket HTTP/1.1 exchanges shared by the tests, for requests an HTTP client would normalise away."""

from __future__ import annotations

import asyncio


async def read_all(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    """Everything the peer sends within `timeout`, and whether it closed (or reset) the connection."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        return data, False
    except ConnectionError:
        return data, True
    return data, True


async def raw_exchange(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send `data` on a fresh connection and return what comes back until the server closes."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        out, _ = await read_all(r, timeout)
        return out
    finally:
        w.transport.abort()
