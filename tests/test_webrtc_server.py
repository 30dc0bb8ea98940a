"""`tccp serve` HTTP surface: page, health, metrics, signaling limits, token, capacity.

Sessions are the pass-through test double (`streaming.passthrough`): these tests are
about the server's contract with browsers and strangers, not the model (the model path
is covered end to end in test_webrtc_e2e.py).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest

from streaming.client import ClipVideoTrack, OfferRefused, connect
from streaming.passthrough import PassthroughSession
from streaming.server import ServerConfig, create_app, start_server, state_of

TOKEN = "s3cret-token"


@pytest.fixture
async def server(request):
    """(app, base_url) for a pass-through server; tune it with @pytest.mark.parametrize
    indirect=True or the defaults."""
    cfg = getattr(request, "param", None) or ServerConfig(media_timeout_s=3.0)
    app = create_app(cfg, PassthroughSession)
    runner, url = await start_server(app, "127.0.0.1", 0)
    yield app, url
    await runner.cleanup()


def _frames(n: int = 25, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


async def _post(url: str, data, headers=None) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=data, headers=headers or {}) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except json.JSONDecodeError:
                return resp.status, text


async def _wait_sessions(app, n: int, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if state_of(app).active == n:
            return True
        await asyncio.sleep(0.1)
    return state_of(app).active == n


async def test_page_health_and_metrics(server):
    app, url = server
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/") as r:
            assert r.status == 200 and "client.js" in await r.text()
        async with http.get(url + "/client.js") as r:
            js = await r.text()
            assert r.status == 200 and "/offer" not in js and '"offer"' in js  # relative URL
        async with http.get(url + "/healthz") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "ok"
        async with http.get(url + "/metrics") as r:
            text = await r.text()
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    for name in ("tccp_sessions_active 0.0", "tccp_sessions_max 4.0",
                 "tccp_window_latency_seconds_bucket", "tccp_frame_latency_seconds_bucket"):
        assert name in text


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"x" * (70 * 1024), 413, "limit is 65536"),
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "expected a JSON object"),
        (json.dumps({"sdp": "v=0\r\n", "type": "answer"}).encode(), 400, '"type" must be "offer"'),
        (json.dumps({"sdp": "hello", "type": "offer"}).encode(), 400, "not a session description"),
        (json.dumps({"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "type": "offer"}).encode(),
         400, "no video track"),
        (json.dumps({"sdp": "v=0\r\nm=video x\r\n", "type": "offer"}).encode(), 400,
         "could not use the offer"),
    ],
)
async def test_bad_offers_get_one_line_reasons(server, body, status, words):
    app, url = server
    code, reply = await _post(url + "/offer", body, {"Content-Type": "application/json"})
    assert code == status
    assert isinstance(reply, dict) and words in reply["error"] and "\n" not in reply["error"]
    assert state_of(app).active == 0  # nothing leaked


async def test_oversized_chunked_body_is_413(server):
    _, url = server

    async def chunks():
        for _ in range(40):
            yield b"y" * 4096  # 160 KiB without a Content-Length

    code, reply = await _post(url + "/offer", chunks())
    assert code == 413 and "limit" in reply["error"]


@pytest.mark.parametrize("server", [ServerConfig(token=TOKEN, media_timeout_s=3.0)], indirect=True)
async def test_token_required(server):
    app, url = server
    offer = json.dumps({"sdp": "v=0\r\nm=video 9\r\n", "type": "offer"})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        code, reply = await _post(url + "/offer", offer, headers)
        assert code == 401, headers
        assert "token" in reply["error"]
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as r:
            assert r.status == 401
        async with http.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
        async with http.get(url + "/healthz") as r:
            assert r.status == 200  # health stays open for load balancers
            assert "calls" not in await r.json()  # ... but per-call details need the token
        async with http.get(url + "/healthz", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert (await r.json())["calls"] == []
    with pytest.raises(OfferRefused) as err:
        await connect(url, ClipVideoTrack(_frames()), token="wrong")
    assert err.value.status == 401
    pc, received, answer = await connect(url, ClipVideoTrack(_frames()), token=TOKEN, want_frames=10)
    try:
        assert answer["type"] == "answer" and "m=video" in answer["sdp"]
        await asyncio.wait_for(received.done.wait(), 20)
        assert received.sizes == {(64, 64)}
    finally:
        await pc.close()


@pytest.mark.parametrize("server", [ServerConfig(max_sessions=1, media_timeout_s=3.0)], indirect=True)
async def test_over_capacity_is_503_until_a_slot_frees(server):
    app, url = server
    pc1, rec1, _ = await connect(url, ClipVideoTrack(_frames()), want_frames=5)
    try:
        with pytest.raises(OfferRefused) as err:
            await connect(url, ClipVideoTrack(_frames()))
        assert err.value.status == 503
        assert "server is full: 1 of 1 sessions" in err.value.body["error"]
        assert err.value.body["max_sessions"] == 1
        await asyncio.wait_for(rec1.done.wait(), 20)  # the first one is unaffected
    finally:
        await pc1.close()
    assert await _wait_sessions(app, 0, 5.0)
    pc2, rec2, _ = await connect(url, ClipVideoTrack(_frames()), want_frames=5)
    try:
        await asyncio.wait_for(rec2.done.wait(), 20)
    finally:
        await pc2.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as r:
            text = await r.text()
    assert 'tccp_sessions_rejected_total{reason="capacity"} 1.0' in text
    assert "tccp_sessions_started_total 2.0" in text


def test_a_closing_peer_gives_its_slot_back_at_once_but_holds_the_idle_pass():
    """A peer whose teardown is still running (aiortc's close of a vanished peer can take
    seconds) no longer counts against max_sessions or /healthz's sessions, but the idle
    memory pass still waits for it (`held`)."""
    from types import SimpleNamespace

    from streaming.server import ServerState

    st = ServerState(config=None, session_factory=None, metrics=None)
    st.peers = {"a": SimpleNamespace(closing=False), "b": SimpleNamespace(closing=True)}
    st.pending = 1
    assert (st.active, st.held) == (2, 3)
    st.peers["a"].closing = True
    st.pending = 0
    assert (st.active, st.held) == (0, 2)


# --------------------------------------------------------------------------- odd cameras


async def test_4k_camera_is_scaled_down_and_the_page_is_told(server):
    """A camera sending 3840x2160 (here at 2 fps: encoding 4K costs the test client
    ~0.3 s a frame) is scaled to 1280 px on arrival; the call works, the page's stats say
    what happened, the server stays healthy."""
    app, url = server
    big = np.zeros((2, 2160, 3840, 3), np.uint8)
    big[:, :, 1920:] = 200
    pc, rec, _ = await connect(url, ClipVideoTrack(big, fps=2.0), want_frames=4)
    try:
        await asyncio.wait_for(rec.done.wait(), 60)
        assert rec.sizes == {(1280, 720)}
        assert await _until(lambda: any(s.get("input_size") for s in rec.stats), 10)
        last = [s for s in rec.stats if s.get("input_size")][-1]
        assert last["input_size"] == [3840, 2160] and last["size"] == [1280, 720]
        assert 0.0 <= last["generated_share"] <= 1.0 and last["playout_delay_ms"] > 0
        code, health = await _get(url + "/healthz")
        (call,) = health["calls"]
        assert call["frames_out"] >= 1 and call["generated_share"] == 0.0 and "playout" in call
    finally:
        await pc.close()
    code, health = await _get(url + "/healthz")
    assert code == 200 and health["status"] == "ok"


@pytest.mark.parametrize("server", [ServerConfig(media_timeout_s=2.5, delay_s=0.3)], indirect=True)
async def test_1fps_camera_keeps_its_call_and_gets_each_frame_back(server):
    """One frame a second is slow but alive: the watchdog (2.5 s) keeps the call and
    the frames come back, held on screen between camera frames. (aiortc's receiver
    hands a frame on only when the next one starts arriving, so at 1 fps the server
    sees each frame a second late: the first comes back after ~1 s.)"""
    app, url = server
    frames = _frames(8)
    video = ClipVideoTrack(frames, fps=1.0, loop=False)
    pc, rec, _ = await connect(url, video, want_frames=5)
    try:
        await asyncio.wait_for(rec.done.wait(), 30)
        assert rec.first_at - video._start < 2.0
        assert state_of(app).active == 1
        assert state_of(app).metrics.sessions_closed.labels("media_timeout")._value.get() == 0
    finally:
        await pc.close()


def test_token_is_compared_in_constant_time(monkeypatch):
    import hmac

    import streaming.server as srv

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(srv.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))

    class Req:
        headers = {"Authorization": "Bearer guess"}

    assert not srv._token_ok(Req(), TOKEN) and calls == [(b"guess", TOKEN.encode())]


async def _until(predicate, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return predicate()


async def _get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            return r.status, await r.json()
