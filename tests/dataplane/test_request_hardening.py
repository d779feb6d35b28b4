"""Request-side hardening (#11): chunk framing bounded within one read, a bad first chunk held back from a
pooled upstream, and request lines and paths that nginx refuses. Every refusal reaches no upstream."""

from __future__ import annotations

import asyncio

import pytest

from proxy.settings import Limits
from tests.dataplane.helpers import Client, Proxy, simple_route, start_proxy, table, version

LIMITS = Limits()
FRAMING = LIMITS.max_header_bytes + LIMITS.max_request_line  # the documented bound on framing in a row
CHUNKED = b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture
async def env(upstreams):  # type: ignore[no-untyped-def]
    a = await upstreams()
    p = await start_proxy(table([version("v1", a)], [simple_route(("v1", 1.0))]))
    yield p, a
    await p.dp.shutdown(0.5)


async def answer(p: Proxy, raw: bytes) -> tuple[int, bool]:
    """The status the proxy answers `raw` (sent in one write) with, and whether it then closed."""
    c = await Client.open(p.port)
    try:
        r = await c.request(raw)
        if r.header("connection") != "close":
            return r.status, False
        return r.status, await c.closed()
    finally:
        c.close()


# -- item 2: chunk framing bounded however the bytes are segmented

FRAMING_REFUSED = {
    # One write each: the whole run of framing is in the proxy's first read or two.
    "extension_100k": CHUNKED + b"5;e=" + b"x" * 100_000 + b"\r\nhello\r\n0\r\n\r\n",
    "extension_just_over": CHUNKED + b"5;e=" + b"x" * FRAMING + b"\r\nhello\r\n0\r\n\r\n",
    "last_chunk_extension_100k": CHUNKED + b"0;e=" + b"x" * 100_000 + b"\r\n\r\n",
    "trailer_100k": CHUNKED + b"0\r\nX-Big: " + b"t" * 100_000 + b"\r\n\r\n",
    # The message ends in the same read that takes the run past the bound.
    "trailer_just_over": CHUNKED + b"0\r\nX-Big: " + b"t" * FRAMING + b"\r\n\r\n",
    "trailer_1m": CHUNKED + b"0\r\nX-Big: " + b"t" * 1_000_000 + b"\r\n\r\n",
    "leading_zeros_100k": CHUNKED + b"0" * 100_000 + b"5\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(FRAMING_REFUSED))
async def test_framing_run_over_the_bound_in_one_write_is_431(env, name: str) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    assert await answer(p, FRAMING_REFUSED[name]) == (431, True)
    assert p.stats.rejected == {"too_large": 1}
    await asyncio.sleep(0.05)
    assert a.nothing_received


async def test_trailer_over_the_bound_after_a_chunk_never_completes_upstream(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    raw = CHUNKED + b"3\r\nabc\r\n0\r\nX-Big: " + b"t" * 100_000 + b"\r\n\r\n"
    assert await answer(p, raw) == (431, True)
    assert p.stats.rejected == {"too_large": 1}
    await asyncio.sleep(0.05)
    # The first chunk was clean, so head and chunk may have been streamed; the request is never completed.
    assert a.traffic == []


async def test_extension_over_the_bound_after_a_large_chunk_is_431(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    # After a large chunk the proxy parses large slices: the long run after it is still counted whole.
    raw = CHUNKED + b"%x\r\n%b\r\n" % (100_000, b"x" * 100_000) + b"5;e=" + b"x" * FRAMING + b"\r\nhello\r\n0\r\n\r\n"
    assert await answer(p, raw) == (431, True)
    assert p.stats.rejected == {"too_large": 1}
    await asyncio.sleep(0.05)
    assert a.traffic == []  # the first chunk was clean: its read may have been streamed, never a whole request


@pytest.mark.parametrize("size", [1000, FRAMING // 2])
async def test_framing_run_well_under_the_bound_passes(env, size: int) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    raw = CHUNKED + b"5;e=" + b"x" * size + b"\r\nhello\r\n0\r\nX-Sum: " + b"t" * size + b"\r\n\r\n"
    assert await answer(p, raw) == (200, False)
    assert [r.body for r in a.traffic] == [b"hello"]
    assert p.stats.rejected == {}


@pytest.mark.parametrize(("ext", "big_first"), [(b"", False), (b"", True), (b";abcdefgh", False)])
async def test_many_small_chunks_in_one_write_pass(env, ext: bytes, big_first: bool) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    # 5 (or 14) bytes of framing per body byte, over 3x the bound in total but never more than 14 in a row;
    # after a large chunk too (the proxy parses larger slices after mostly-data ones).
    small = b"y" * (3 * FRAMING // 6)
    big = b"x" * 100_000 if big_first else b""
    raw = CHUNKED + (b"%x\r\n%b\r\n" % (len(big), big) if big else b"")
    raw += b"".join(b"1%b\r\n%b\r\n" % (ext, small[i:i + 1]) for i in range(len(small))) + b"0\r\n\r\n"
    assert await answer(p, raw) == (200, False)
    assert [r.body for r in a.traffic] == [big + small]
    assert p.stats.rejected == {}


async def test_framing_bound_holds_for_extension_dribbled_with_body_in_between(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    c = await Client.open(p.port)
    try:
        # Body bytes between long extensions reset the run: each run stays under the bound, the total does not.
        await c.send(CHUNKED)
        for _ in range(4):
            await c.send(b"1;e=" + b"x" * (FRAMING // 2) + b"\r\nz\r\n")
            await asyncio.sleep(0.01)
        r = await c.request(b"0\r\n\r\n")
        assert r.status == 200
    finally:
        c.close()
    assert [r.body for r in a.traffic] == [b"zzzz"]


# -- item 3: a bad first chunk never reaches a pooled upstream


async def idle_pooled(p: Proxy) -> None:
    ep = p.dp.backends["v1"].endpoints[0]
    for _ in range(200):
        if ep.idle:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no idle pooled upstream connection")


BAD_FIRST_CHUNK = {
    "data_overrun": CHUNKED + b"5\r\nhelloXX\r\n0\r\n\r\n",
    "data_overrun_long": CHUNKED + b"5\r\nhello" + b"X" * 5000 + b"\r\n0\r\n\r\n",
    "bad_second_size": CHUNKED + b"5\r\nhello\r\nZZ\r\nabc\r\n0\r\n\r\n",
    "lf_only_after_data": CHUNKED + b"5\r\nhello\nX\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("name", sorted(BAD_FIRST_CHUNK))
async def test_bad_first_chunk_never_reaches_an_idle_pooled_upstream(env, name: str, split: bool) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    raw = BAD_FIRST_CHUNK[name]
    rounds = 6  # the unfixed proxy leaked on about 1 probe in 3
    for _ in range(rounds):
        g = await Client.open(p.port)
        assert (await g.get()).status == 200
        g.close()
        await idle_pooled(p)
        c = await Client.open(p.port)
        try:
            if split:
                # The bad bytes arrive in a later read than the chunk data they follow.
                cut = raw.index(b"hello") + 5
                await c.send(raw[:cut])
                await asyncio.sleep(0.02)
                raw_rest = raw[cut:]
            else:
                raw_rest = raw
            r = await c.request(raw_rest)
            assert r.status == 400
            assert await c.closed()
        finally:
            c.close()
    await asyncio.sleep(0.05)
    assert p.stats.rejected == {"bad_request": rounds}
    assert a.partial == []
    assert [(r.method, r.target) for r in a.traffic] == [("GET", "/")] * rounds


async def test_bad_chunk_in_a_later_read_than_a_clean_first_chunk_leaves_an_incomplete_request(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    g = await Client.open(p.port)
    assert (await g.get()).status == 200
    g.close()
    await idle_pooled(p)
    c = await Client.open(p.port)
    try:
        await c.send(CHUNKED + b"5\r\nhello\r\n")
        await asyncio.sleep(0.05)  # parsed cleanly in its own read: head and first chunk are streamed
        r = await c.request(b"ZZ\r\nabc\r\n0\r\n\r\n")
        assert r.status == 400
        assert await c.closed()
    finally:
        c.close()
    await asyncio.sleep(0.05)
    # What reached the upstream: the head (and the first chunk), then its connection was closed before a last
    # chunk, so it holds a request it can only discard as incomplete.
    assert [(r.method, r.target) for r in a.traffic] == [("GET", "/")]
    assert len(a.partial) == 1 and a.partial[0].startswith(b"POST /up HTTP/1.1\r\n")
    assert p.stats.rejected == {"bad_request": 1}


async def test_first_clean_chunk_is_streamed_before_the_body_ends() -> None:
    got = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers as soon as the head and the first chunk arrived, before the rest of the body.
        got.set_result(await reader.readuntil(b"hello\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    p = await start_proxy(table([version("v1", url)], [simple_route(("v1", 1.0))]))
    try:
        c = await Client.open(p.port)
        r = await c.request(CHUNKED + b"5\r\nhello\r\n")
        assert (r.status, r.body) == (200, b"ok")
        assert (await got).endswith(b"\r\n\r\n5\r\nhello\r\n")
        c.close()
    finally:
        await p.dp.shutdown(0.5)
        srv.close()


async def test_first_chunk_larger_than_high_water_is_streamed(env) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    g = await Client.open(p.port)
    assert (await g.get()).status == 200
    await idle_pooled(p)
    body = b"b" * (3 * LIMITS.high_water)
    r = await g.request(CHUNKED + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
    g.close()
    assert r.status == 200
    assert [len(r.body) for r in a.traffic] == [0, len(body)]


# -- item 4: request lines and paths nginx refuses

LINES = {
    "http_2_0": (b"GET /x HTTP/2.0\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_3_0": (b"GET /x HTTP/3.0\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_0_9_line": (b"GET /x HTTP/0.9\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_0_9_simple": (b"GET /x\r\n\r\n", 505, "bad_request"),
    "http_1_2": (b"GET /x HTTP/1.2\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_9_7": (b"GET /x HTTP/9.7\r\nHost: app\r\n\r\n", 505, "bad_request"),
    "http_1_x": (b"GET /x HTTP/1.x\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_invalid": (b"GET /x/%zz/ HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_one_digit": (b"GET /x/%4g HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_truncated": (b"GET /x/%4 HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_trailing": (b"GET /x/% HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_nul": (b"GET /x/%00/ HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_nul_before_query": (b"GET /x%00?a=1 HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_invalid_absolute_form": (b"GET http://app/x/%zz/ HTTP/1.1\r\nHost: app\r\n\r\n", 400, "bad_request"),
    "pct_nul_http10": (b"GET /x/%00/ HTTP/1.0\r\n\r\n", 400, "bad_request"),
}


@pytest.mark.parametrize("name", sorted(LINES))
async def test_refused_request_line(env, name: str) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    raw, status, reason = LINES[name]
    assert await answer(p, raw) == (status, True)
    assert p.stats.rejected == {reason: 1}
    await asyncio.sleep(0.02)
    assert a.nothing_received


ACCEPTED = {
    "http_1_1": (b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n", "/x"),
    "http_1_0": (b"GET /x HTTP/1.0\r\n\r\n", "/x"),
    "http_1_0_host": (b"GET /x HTTP/1.0\r\nHost: app\r\n\r\n", "/x"),
    "pct_valid": (b"GET /x/%2F%41%e9/ HTTP/1.1\r\nHost: app\r\n\r\n", "/x/%2F%41%e9/"),
    "pct_in_query_not_checked": (b"GET /x?q=100%&z=%00 HTTP/1.1\r\nHost: app\r\n\r\n", "/x?q=100%&z=%00"),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
async def test_accepted_request_line(env, name: str) -> None:  # type: ignore[no-untyped-def]
    p, a = env
    raw, target = ACCEPTED[name]
    status, _ = await answer(p, raw)
    assert status == 200
    assert [r.target for r in a.traffic] == [target]
    assert p.stats.rejected == {}
