"""HTTP/2 limits and abuse, with raw frames written through the `h2` library (client side) over real sockets:
max concurrent streams, header list size, rapid reset (CVE-2023-44487), CONTINUATION flood, SETTINGS and
PING floods, a zero window held forever, and malformed requests that must never reach an upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import h2.events
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

from proxy.settings import Limits, Listener, Settings, Timeouts
from tests.dataplane.h2client import Closed, RawH2
from tests.dataplane.helpers import Proxy, Request, Upstream, ok, simple_route, start_proxy, table, version

LIMITS = Limits(max_header_bytes=4096, h2_max_concurrent_streams=100, h2_max_resets=50, h2_max_control_frames=50)



@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await RawH2.close_all()

@pytest.fixture
async def up(upstreams: Any) -> Upstream:
    return await upstreams(name="a")  # type: ignore[no-any-return]


@pytest.fixture
async def proxy(up: Upstream) -> AsyncIterator[Proxy]:
    p = await start_proxy(table([version("v1", up)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), limits=LIMITS,
                                   listeners=(Listener("plain", ("127.0.0.1", 0), protocols=("h2c",)),)))
    yield p
    await p.dp.shutdown(0.5)


async def settings_of(c: RawH2) -> dict[int, int]:
    ev = await c.until(h2.events.RemoteSettingsChanged)
    return {int(k): v.new_value for k, v in ev.changed_settings.items()}  # type: ignore[attr-defined]


async def test_settings_advertise_100_streams_and_the_101st_open_one_is_refused_alone(upstreams: Any) -> None:
    gate = asyncio.Event()

    async def held(req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        await gate.wait()
        return ok(req.target.encode())

    a = await upstreams(held, name="a")
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0),
                                   listeners=(Listener("plain", ("127.0.0.1", 0), protocols=("h2c",)),)))
    try:
        c = await RawH2.open(p.port)
        settings = await settings_of(c)
        assert (settings[SettingCodes.MAX_CONCURRENT_STREAMS], settings[SettingCodes.MAX_HEADER_LIST_SIZE]) == (
            100, 64 * 1024)
        # The h2 client itself keeps to the limit: write the HEADERS frames past its state machine.
        sids = list(range(1, 2 * 101, 2))
        frames = b"".join(HeadersFrame(sid, c.conn.encoder.encode(c.headers(f"/{sid}")),
                                       flags=["END_HEADERS", "END_STREAM"]).serialize() for sid in sids)
        await c.write_raw(frames)
        async with asyncio.timeout(5):
            while len(a.traffic) < 100:  # noqa: ASYNC110 (the upstream helper records without an event)
                await asyncio.sleep(0.02)
        reset = await read_frames_until_reset(c)
        assert reset == (sids[-1], ErrorCodes.REFUSED_STREAM)
        gate.set()
        await asyncio.sleep(0.3)
        assert len(a.traffic) == 100  # the refused one never went upstream
        assert len(p.dp.conns) == 1  # a stream error: the connection and its 100 streams go on
        c.close()
    finally:
        gate.set()
        await p.dp.shutdown(0.5)


async def read_frames_until_reset(c: RawH2) -> tuple[int, int]:
    """Raw frames (the h2 client never opened these streams): the first RST_STREAM's (stream, code)."""
    buf = b""
    async with asyncio.timeout(5):
        while True:
            data = await c.reader.read(65536)
            assert data, "closed"
            buf += data
            while len(buf) >= 9:
                n = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + n:
                    break
                kind, sid = buf[3], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                if kind == 3:  # RST_STREAM
                    return sid, int.from_bytes(buf[9:13], "big")
                buf = buf[9 + n:]


async def test_a_header_list_over_the_limit_is_refused_and_reaches_no_upstream(proxy: Proxy, up: Upstream) -> None:
    c = await RawH2.open(proxy.port)
    await settings_of(c)
    assert (await c.request("/fine"))[0] == 200  # our SETTINGS are acknowledged by now
    status, _, _ = await c.request("/big", extra=[(b"x-big", b"v" * 3000), (b"x-big2", b"v" * 1500)])
    assert status == 431
    # Past twice the limit the proxy stops decoding at all (an HPACK bomb): the connection ends.
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, c.headers("/bomb", extra=[(b"x-big", b"v" * 9000)]), end_stream=True)
    await c.flush()
    goaway = await c.until(h2.events.ConnectionTerminated)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]
    assert [r.target for r in up.traffic] == ["/fine"]
    c.close()


async def test_rapid_reset_is_bounded_then_goaway_enhance_your_calm_while_another_client_is_served(
        proxy: Proxy, up: Upstream) -> None:
    attacker = await RawH2.open(proxy.port)
    other = await RawH2.open(proxy.port)
    assert (await other.request("/before"))[0] == 200
    sent = 0
    sid = 1
    cut = asyncio.create_task(attacker.until(h2.events.ConnectionTerminated, timeout=10))
    while sent < 10_000 and not cut.done():
        batch = b""
        for _ in range(20):
            block = attacker.conn.encoder.encode(attacker.headers(f"/r{sid}"))
            batch += HeadersFrame(sid, block, flags=["END_HEADERS", "END_STREAM"]).serialize()
            batch += RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize()
            sid += 2
            sent += 1
        if not await attacker.write_raw(batch):
            break
        await asyncio.sleep(0)
        if sent % 200 == 0:
            assert (await other.request(f"/during{sent}"))[0] == 200
    goaway = await cut
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]
    await attacker.until(Closed)
    # Bounded: the proxy took no stream after the one that spent the budget (50 resets a second; at most two
    # budgets if a second ended during the attack), of the 10,000 the attacker wrote.
    assert goaway.last_stream_id <= 2 * (2 * 50 + 1) - 1  # type: ignore[attr-defined]
    assert proxy.stats.rejected["bad_request"] == 1
    assert (await other.request("/after"))[0] == 200
    other.close()


async def test_endless_continuation_frames_never_buffer_past_the_header_limit(proxy: Proxy, up: Upstream) -> None:
    c = await RawH2.open(proxy.port)
    await settings_of(c)
    block = b"\x00" * 1000  # 1,000 bytes per frame; the limit is 4,096
    await c.write_raw(HeadersFrame(1, block).serialize() + ContinuationFrame(1, block).serialize()
                      + ContinuationFrame(1, block).serialize())
    await asyncio.sleep(0.3)
    assert not c.closed and not any(isinstance(e, h2.events.ConnectionTerminated) for e in c.events)
    frames = 3
    while frames < 100_000 and await c.write_raw(ContinuationFrame(1, block).serialize()):
        frames += 1
        if frames == 5:
            goaway = await c.until(h2.events.ConnectionTerminated, timeout=5)
            assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]
            break
    assert frames == 5  # the fifth frame took the block past 4,096 bytes
    await c.until(Closed)
    assert up.nothing_received


@pytest.mark.parametrize("frame", [PingFrame(0, b"12345678"), SettingsFrame(0, {SettingCodes.ENABLE_PUSH: 0})],
                         ids=["ping", "settings"])
async def test_a_control_frame_flood_is_bounded_then_goaway(proxy: Proxy, frame: Any) -> None:
    c = await RawH2.open(proxy.port)
    other = await RawH2.open(proxy.port)
    one = frame.serialize()
    sent = 0
    while sent < 100_000 and await c.write_raw(one * 100):
        sent += 100
        await asyncio.sleep(0)
        if sent % 1000 == 0:
            break
    goaway = await c.until(h2.events.ConnectionTerminated, timeout=5)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]
    await c.until(Closed)
    acks = sum(1 for e in c.events if isinstance(e, h2.events.PingAckReceived | h2.events.SettingsAcknowledged))
    assert acks <= 50 + 1  # the budget (the read that broke it is not answered) and our own SETTINGS' ack
    assert (await other.request("/ok"))[0] == 200
    other.close()


async def test_a_zero_window_held_forever_is_closed_by_the_write_timeout(up: Upstream) -> None:
    p = await start_proxy(table([version("v1", up)], [simple_route(("v1", 1.0))]),
                          Settings(listen=("127.0.0.1", 0), timeouts=Timeouts(upstream_idle=0.5),
                                   listeners=(Listener("plain", ("127.0.0.1", 0), protocols=("h2c",)),)))
    try:
        c = await RawH2.open(p.port, window=0)
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, c.headers("/"), end_stream=True)
        await c.flush()
        resp = await c.until(h2.events.ResponseReceived, stream_id=sid)
        assert dict(resp.headers)[b":status"] == b"200"  # type: ignore[attr-defined]
        t0 = asyncio.get_running_loop().time()
        await c.until(Closed, timeout=5)
        waited = asyncio.get_running_loop().time() - t0
        assert 0.3 < waited < 2.0
        assert c.bodies.get(sid) is None
    finally:
        await p.dp.shutdown(0.5)


@pytest.mark.parametrize("headers", [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app")],  # no :path
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"), (b":path", b"/"), (b"X-Upper", b"1")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"), (b":path", b"/"),
     (b"connection", b"keep-alive")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"), (b":path", b"/"), (b"te", b"gzip")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"), (b":path", b"/"),
     (b"transfer-encoding", b"chunked")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"x-a", b"1"), (b":authority", b"app")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"), (b":path", b"/"),
     (b"x-smuggle", b"a\r\nx-injected: 1")],
    [(b":method", b"GET"), (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"app"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"), (b":path", b"/"), (b":status", b"200")],
], ids=["no-path", "upper-case", "connection", "te-gzip", "transfer-encoding", "pseudo-after-regular", "crlf",
        "two-methods", "response-pseudo"])
async def test_a_malformed_request_is_a_stream_error_and_never_forwarded(proxy: Proxy, up: Upstream,
                                                                         headers: list[tuple[bytes, bytes]]) -> None:
    c = await RawH2.open(proxy.port)
    c.conn.send_headers(1, headers, end_stream=True)
    await c.flush()
    reset = await c.until(h2.events.StreamReset, stream_id=1)
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR  # type: ignore[attr-defined]
    assert up.nothing_received
    # A stream error: the connection goes on.
    assert (await c.request("/next", extra=[(b"te", b"trailers")]))[0] == 200
    assert [r.target for r in up.traffic] == ["/next"]
    assert up.traffic[0].header("te") is None
    c.close()
