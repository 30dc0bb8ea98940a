"""`tccp serve`: browser camera + microphone in over WebRTC, edited video back.

Signaling is one HTTP round trip (aiortc's server-example convention): the page POSTs
its complete offer `{"sdp", "type": "offer"}` to `/offer` and gets the complete answer
in the same shape; ICE candidates travel inside the SDP (no trickle). Everything a
stranger could send is bounded: bodies over 64 KiB get 413, bad JSON/SDP 400 with a
one-line reason, a missing/wrong bearer token 401, a full server 503. See
docs/streaming.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import inspect
import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tccp.errors import TCCPError

__all__ = [
    "ServerConfig", "ServerState", "state_of", "create_app", "start_server", "serve",
    "add_arguments", "main", "STATIC_DIR", "limit_malloc_arenas", "freeze_startup_objects", "trim_heap",
    "set_threads", "ModelSessions",
]

log = logging.getLogger("tccp.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY = 64 * 1024
PROTECTED = ("/offer", "/metrics", "/test-report", "/avatars")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_sessions: int = 4
    max_body: int = MAX_BODY
    media_timeout_s: float = 5.0
    connect_timeout_s: float = 20.0
    max_side: int | None = 1280
    audio_back: bool = True
    test_report: bool = False
    """Enable POST /test-report (the page's `?report=1` mode posts its counters there)."""
    label: str = "model"
    """What the sessions are, for /healthz ('passthrough' in the debug mode)."""
    avatar_roots: tuple[str, ...] | None = None
    """Folders whose avatars the page may pick (None: ./avatars, ~/.tccp/avatars)."""
    default_avatar: str | None = None
    """The avatar of sessions whose offer names none (`--avatar`), for GET /avatars."""
    delay_s: float | None = None
    """Playout delay of a call at its start (None: from `window_s`; see streaming/playout.py)."""
    max_delay_s: float = 1.0
    """The playout delay never grows past this; later edited frames are replaced by originals."""
    window_s: float | None = None
    """The model's per-window time measured at start-up (`streaming.live.warm_up`)."""
    warmup_s: float | None = None
    """How long the start-up warm-up took (shown in /healthz)."""


@dataclass
class ServerState:
    config: Any
    session_factory: Any
    metrics: Any
    peers: dict = field(default_factory=dict)
    pending: int = 0
    reports: list = field(default_factory=list)
    report_event: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.monotonic)
    trim_pending: bool = False
    memory_passes: int = 0  # idle collections + trims after sessions closed (see trim_heap)

    @property
    def active(self) -> int:
        """Calls that hold a slot: open peers and offers being answered. A peer that is
        closing no longer does (its engine session is dropped at once; aiortc's teardown
        of a vanished peer can take seconds, 1.9 s measured under 4-call load), so a caller
        whose connection dropped gets back in as soon as the server noticed."""
        return sum(1 for p in self.peers.values() if not p.closing) + self.pending

    @property
    def held(self) -> int:
        """Everything not yet torn down, closing peers included (the idle memory pass
        waits for these)."""
        return len(self.peers) + self.pending


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def _key():
    from aiohttp import web

    return web.AppKey("tccp", ServerState)


def state_of(app) -> ServerState:
    """The server's live state (peers, counters, test reports) of an app from create_app."""
    return app[_key()]


def _error(status: int, message: str, headers: dict | None = None, **extra: Any):
    """JSON error `{"error": "<one line>", ...}` with `status`."""
    from aiohttp import web

    body = {"error": " ".join(str(message).split()), **extra}
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tccp"'
    return web.json_response(body, status=status, headers=headers)


def _token_ok(request, token: str | None) -> bool:
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


async def _read_json(request, limit: int) -> Any:
    """The body as JSON, or an error response (413 / 400) to return as is."""
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"request body is {request.content_length} bytes; the limit is {limit}")
    try:
        raw = await request.content.read(limit + 1)
    except Exception as exc:  # client went away mid-body
        return _error(400, f"could not read the request body: {exc}")
    if len(raw) > limit:
        return _error(413, f"request body is over the {limit}-byte limit")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _error(400, f"body is not valid JSON: {exc}")


def _check_offer(data: Any) -> str | None:
    """Why this is not a usable offer (None if it looks like one)."""
    if not isinstance(data, dict):
        return 'expected a JSON object {"sdp": ..., "type": "offer"}'
    sdp, kind = data.get("sdp"), data.get("type")
    if kind != "offer":
        return f'"type" must be "offer", got {kind!r}'[:200]
    if not isinstance(sdp, str) or not sdp.strip():
        return '"sdp" must be a non-empty string'
    if not sdp.lstrip().startswith("v=0"):
        return '"sdp" is not a session description (must start with "v=0")'
    if "\nm=video" not in sdp.replace("\r\n", "\n"):
        return "the offer has no video track (the page must send a camera)"
    return None


# --------------------------------------------------------------------------- handlers


async def _index(request):
    from aiohttp import web

    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})


async def _client_js(request):
    from aiohttp import web

    return web.FileResponse(STATIC_DIR / "client.js", headers={"Cache-Control": "no-store"})


async def _healthz(request):
    from aiohttp import web

    st: ServerState = state_of(request.app)
    body = {
        "status": "ok",
        "sessions": st.active,
        "closing": st.held - st.active,
        "max_sessions": st.config.max_sessions,
        "sessions_kind": st.config.label,
        "uptime_s": round(time.monotonic() - st.started, 1),
        "memory_passes": st.memory_passes,
        "warmup_s": None if st.config.warmup_s is None else round(st.config.warmup_s, 2),
        "model_window_ms": None if st.config.window_s is None else round(1000 * st.config.window_s, 1),
    }
    if _token_ok(request, st.config.token):  # per-call details only for those who may see /metrics
        body["calls"] = [p.info() for p in st.peers.values()]
    return web.json_response(body)


async def _metrics(request):
    from aiohttp import web

    st: ServerState = state_of(request.app)
    st.metrics.sessions_active.set(st.active)
    body, ctype = st.metrics.render()
    return web.Response(body=body, headers={"Content-Type": ctype})


async def _test_report(request):
    from aiohttp import web

    st: ServerState = state_of(request.app)
    data = await _read_json(request, 4096)
    if isinstance(data, web.StreamResponse):
        return data
    if not isinstance(data, dict):
        return _error(400, "expected a JSON object")
    st.reports.append(data)
    del st.reports[:-16]
    st.report_event.set()
    return web.json_response({"ok": True})


def _avatar_roots(cfg: ServerConfig) -> list[Path] | None:
    return None if cfg.avatar_roots is None else [Path(r) for r in cfg.avatar_roots]


async def _avatars(request):
    """Installed avatars the offer may name: {"avatars": [{name, refs, created,
    validation}], "default": name | null}. Folder paths stay on the server."""
    from aiohttp import web

    from tccp.avatars.store import list_avatars

    cfg: ServerConfig = state_of(request.app).config
    loop = asyncio.get_running_loop()
    items = await loop.run_in_executor(None, list_avatars, _avatar_roots(cfg))
    shown = [{k: it.get(k) for k in ("name", "refs", "created", "validation")} for it in items if it.get("ok")]
    return web.json_response({"avatars": shown, "default": cfg.default_avatar})


def _accepts_avatar(factory) -> bool:
    try:
        return "avatar" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


async def _offer(request):
    from aiohttp import web
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from streaming.peer import Peer, PeerLimits, widen_udp_buffers

    st: ServerState = state_of(request.app)
    cfg: ServerConfig = st.config
    data = await _read_json(request, cfg.max_body)
    if isinstance(data, web.StreamResponse):
        st.metrics.sessions_rejected.labels("too_large" if data.status == 413 else "bad_request").inc()
        return data
    problem = _check_offer(data)
    avatar = data.get("avatar") if isinstance(data, dict) else None
    if not problem and avatar not in (None, ""):
        from tccp.avatars.store import resolve_avatar, valid_name

        if not isinstance(avatar, str) or not valid_name(avatar):
            problem = '"avatar" must be the name of an installed avatar (GET /avatars)'
        elif not _accepts_avatar(st.session_factory):
            problem = f"this server cannot switch avatars ({cfg.label} sessions)"
        else:
            try:
                resolve_avatar(avatar, _avatar_roots(cfg), allow_path=False)
            except TCCPError as exc:
                problem = str(exc)
    if problem:
        st.metrics.sessions_rejected.labels("bad_request").inc()
        return _error(400, problem)
    if st.active >= cfg.max_sessions:
        st.metrics.sessions_rejected.labels("capacity").inc()
        return _error(
            503,
            f"server is full: {st.active} of {cfg.max_sessions} sessions in use; try again later",
            headers={"Retry-After": "5"},
            max_sessions=cfg.max_sessions,
        )

    st.pending += 1  # reserve the slot before the first await
    try:
        try:
            session = st.session_factory(avatar=avatar) if avatar else st.session_factory()
            if inspect.isawaitable(session):
                session = await session
        except TCCPError as exc:  # e.g. a broken avatar pack: one line, the client's choice
            return _error(400, f"could not start a session: {exc}")
        except Exception as exc:
            log.exception("could not create a session")
            return _error(500, f"could not start a session: {exc}")
        pc = RTCPeerConnection()
        limits = PeerLimits(
            media_timeout_s=cfg.media_timeout_s, connect_timeout_s=cfg.connect_timeout_s,
            max_side=cfg.max_side, audio_back=cfg.audio_back, delay_s=cfg.delay_s,
            max_delay_s=cfg.max_delay_s, window_s=cfg.window_s,
            new_frames=int(getattr(getattr(session, "cfg", None), "new_frames", 7)),
        )
        peer = Peer(pc, session, limits, st.metrics, on_closed=lambda p, why: _closed(st, p, why))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=data["sdp"], type="offer"))
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
            widen_udp_buffers(pc)
        except Exception as exc:
            st.metrics.sessions_rejected.labels("bad_request").inc()
            await peer.close("bad_offer")  # stops whatever the offer already started
            return _error(400, f"could not use the offer: {type(exc).__name__}: {exc}"[:300])
        st.peers[peer.id] = peer
        peer.start()
        st.metrics.sessions_started.inc()
        log.info("peer %s: session started (%d active)", peer.id, st.active - 1)
        return web.json_response(
            {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "id": peer.id}
        )
    finally:
        st.pending -= 1
        st.metrics.sessions_active.set(st.active)


def _closed(st: ServerState, peer, reason: str) -> None:
    if st.peers.pop(peer.id, None) is not None:
        kind = reason.split(":", 1)[0]
        st.metrics.sessions_closed.labels(kind).inc()
        st.metrics.sessions_active.set(st.active)
        log.info("peer %s: closed (%s), %d active", peer.id, reason, st.active)
        _schedule_trim(st)


# --------------------------------------------------------------------------- memory
#
# Nothing a session allocates is leaked, but two things made a server's RSS climb with
# every session. Measured over 20 rounds of 4 abandoned sessions: `tccp serve` on a tiny
# random pack 289 -> 1401 MB before, 582 -> 634 MB (flat after round 1) after;
# tests/test_soak.py (real trackers, fake model) 505 -> 1019 MB before, 377 -> 397 after.
# - every session builds its face tracker (mediapipe graphs, ~100 MB of short-lived
#   buffers) on a thread of its own; glibc gives such threads malloc arenas of their
#   own and keeps freed arena pages mapped (the same trackers created and closed on one
#   thread stay flat). Fix: few arenas (`limit_malloc_arenas`, at start) and freed pages
#   returned after sessions close (`trim_heap`, glibc only; no-ops elsewhere).
# - a closed peer (aiortc connection with its codecs, engine session, last windows) sits
#   in reference cycles that only Python's rare full collection frees (a ~150 MB
#   sawtooth). Fix: once the server is idle (no session left), one full collection, on
#   the event loop while no session can stall; the objects that exist at start-up are
#   frozen out of the collector's scans (`gc.freeze`), which keeps that pass short.

_TRIM_DELAY_S = 0.5  # after a peer closes: its tracker is closed on its thread meanwhile (~10 ms)


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (M_ARENA_MAX) for the threads created from now on;
    True if applied. An explicit MALLOC_ARENA_MAX in the environment wins."""
    import os

    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    libc = _libc()
    return bool(libc is not None and libc.mallopt(-8, int(arenas)))  # -8: M_ARENA_MAX


def freeze_startup_objects() -> None:
    """Once the model is loaded: what exists now lives as long as the server, so keep it
    out of every later garbage-collector scan (gc.freeze)."""
    import gc

    gc.collect()
    gc.freeze()


def trim_heap() -> None:
    """Return freed heap pages of every arena to the OS (glibc malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _schedule_trim(st: ServerState) -> None:
    """Shortly after sessions close (several closing together share one pass): collect
    their reference cycles if the server is idle, then return freed pages to the OS."""
    if st.trim_pending:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    st.trim_pending = True

    def run() -> None:
        import gc

        st.trim_pending = False
        if st.held:
            loop.run_in_executor(None, trim_heap)  # sessions running: no collection pause
            return
        gc.collect()  # idle: no session to stall
        trim_heap()
        st.memory_passes += 1

    loop.call_later(_TRIM_DELAY_S, run)


# --------------------------------------------------------------------------- app


def create_app(config: ServerConfig, session_factory) -> "Any":
    """The aiohttp application. `session_factory()` makes one engine session per peer
    (sync or async); pass `streaming.passthrough.PassthroughSession` to test transport
    without a model."""
    from aiohttp import web

    from streaming.metrics import ServerMetrics

    if config.max_sessions < 1:
        raise TCCPError(f"--max-sessions must be at least 1, got {config.max_sessions}")

    @web.middleware
    async def guard(request, handler):
        if request.path in PROTECTED and not _token_ok(request, config.token):
            state_of(request.app).metrics.sessions_rejected.labels("auth").inc()
            return _error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body is over the {config.max_body}-byte limit")

    # client_max_size also bounds multipart/post() readers; our handlers read by hand
    app = web.Application(middlewares=[guard], client_max_size=config.max_body)
    metrics = ServerMetrics()
    metrics.sessions_max.set(config.max_sessions)
    if config.warmup_s is not None:
        metrics.warmup_seconds.set(config.warmup_s)
    if config.window_s is not None:
        metrics.model_window_seconds.set(config.window_s)
    app[_key()] = ServerState(config=config, session_factory=session_factory, metrics=metrics)
    app.router.add_get("/", _index)
    app.router.add_get("/index.html", _index)
    app.router.add_get("/client.js", _client_js)
    app.router.add_post("/offer", _offer)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/avatars", _avatars)
    if config.test_report:
        app.router.add_post("/test-report", _test_report)
    app.on_shutdown.append(_close_all)
    return app


async def _close_all(app) -> None:
    st = state_of(app)
    peers = list(st.peers.values())
    await asyncio.gather(*(p.close("shutdown") for p in peers), return_exceptions=True)


async def start_server(app, host: str, port: int, ssl_context: ssl.SSLContext | None = None):
    """Start serving `app`; returns `(runner, base_url)`. `port=0` picks a free port."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise TCCPError(f"{host}:{port}: cannot listen ({exc.strerror or exc})") from None
    sock = site._server.sockets[0]  # the real port when port=0
    real_port = sock.getsockname()[1]
    scheme = "https" if ssl_context else "http"
    shown = f"[{host}]" if ":" in host else host
    return runner, f"{scheme}://{shown}:{real_port}"


async def serve(config: ServerConfig, session_factory, ssl_context=None, ready=None) -> None:
    """Run until cancelled (Ctrl-C)."""
    app = create_app(config, session_factory)
    runner, url = await start_server(app, config.host, config.port, ssl_context)
    link = url + (f"/?token={config.token}" if config.token else "/")
    print(f"tccp serve: open {link}  (max {config.max_sessions} sessions; Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(url)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free)")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' (the page reads ?token=TOKEN)")
    p.add_argument("--max-sessions", type=int, default=4,
                   help="concurrent sessions; more get 503 (default 4)")
    p.add_argument("--model", default=None, metavar="PACK", help="model pack folder (default: bundled)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="model device (default cpu)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per stage (default: engine's)")
    p.add_argument("--avatar", default=None, metavar="NAME_OR_DIR",
                   help="default avatar of sessions (the page can pick another installed one)")
    p.add_argument("--mouth-scale", type=float, default=1.0, metavar="F",
                   help="lip opening factor: 0 closed, 1 as the pack renders it, >1 exaggerated")
    p.add_argument("--silence-motion", type=float, default=None, metavar="F",
                   help="share of the generated mouth motion kept while the caller is silent: 0 rests the mouth "
                        "fully, 1 turns the rest off (default 0.2)")
    p.add_argument("--landmarks", choices=("generated", "tracked"), default="generated",
                   help="generated: lips from the audio (default); tracked: lips follow the camera")
    p.add_argument("--region", choices=("mouth", "head"), default="mouth",
                   help="mouth: edit the lower face (default); head: the whole head from the references "
                        "(avatar replacement; needs a pack with a head-mode stage 1 unless --landmarks tracked)")
    p.add_argument("--adapt-steps", type=int, default=0, metavar="N",
                   help="adapt stage 1 to each caller: after the first --adapt-seconds of a call with a face, "
                        "fine-tune a copy for N steps on the caller's own speech, in the background (default 0: "
                        "off; 100 steps: ~9 s of one core alone, ~26 s beside a call on 2 cores; docs/lipsync.md)")
    p.add_argument("--adapt-seconds", type=float, default=15.0, metavar="S",
                   help="how much of each call the adaptation learns from (default 15)")
    p.add_argument("--media-timeout", type=float, default=5.0,
                   help="close a peer after this many seconds without incoming media (default 5)")
    p.add_argument("--playout-delay", type=float, default=None, metavar="S",
                   help="how far the returned video and audio run behind the call at its start (default: "
                        "from the model's speed measured at start-up; it adapts up to --max-delay)")
    p.add_argument("--max-delay", type=float, default=1.0, metavar="S",
                   help="the playout delay never grows past this; later edited frames are replaced by the "
                        "caller's own (default 1.0)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch and OpenCV threads (default: half the usable cores, 1 to 4; on a 2-core "
                        "machine 1, which is several times faster than 2 under load)")
    p.add_argument("--cert", default=None, help="TLS certificate (PEM); browsers need HTTPS off localhost")
    p.add_argument("--key", default=None, help="TLS private key (PEM) for --cert")
    p.add_argument("--passthrough", action="store_true",
                   help="debug: return the camera unchanged (no model), to check the network path")
    p.add_argument("--verbose", action="store_true", help="log peer lifecycle events")


def _ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not cert or not key:
        raise TCCPError("--cert and --key must be given together")
    for path in (cert, key):
        if not Path(path).is_file():
            raise TCCPError(f"{path}: no such file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TCCPError(f"{cert}: cannot load the certificate/key pair ({exc})") from None
    return ctx


class ModelSessions:
    """Session factory of the model server: `await factory(avatar=None)` makes one live
    engine Session.

    One SharedModel per model actually used: the default (the pack, or `--avatar`) is
    loaded up front and warmed (`warm()`: one short run of the bundled sample, so no
    call pays first-call costs, and the per-window time that sets the calls' playout
    delay); an avatar an offer picks is loaded (and warmed) on first use, off the event
    loop, and kept, since its fine-tuned weights are a model of their own. Sessions on
    one model queue their windows on its single worker thread, which batches windows
    of different peers that arrive together. Face trackers come ready from a pool
    (`streaming.live.TrackerPool`, one per session slot) and go back to it.
    Sessions run the live policy (`streaming.live.LiveController`): a pack without a
    stage 2 runs the warp-only rung from the first window, and no session parks in
    pass-through.
    """

    def __init__(self, pack: str | None, device: str, steps: int | None = None, *, avatar: str | None = None,
                 mouth_scale: float = 1.0, landmarks: str = "generated", roots: list[Path] | None = None,
                 trackers: int = 4, model: Any = None, region: str = "mouth", adapt_steps: int = 0,
                 adapt_seconds: float = 15.0, silence_motion: float | None = None) -> None:
        from engine.config import EngineConfig
        from engine.model import load_model
        from streaming.live import TrackerPool

        self.pack, self.device, self.mouth_scale, self.roots = pack, device, mouth_scale, roots
        self.base = EngineConfig(live=True, landmarks=landmarks, mouth_scale=mouth_scale, region=region,
                                 silence_motion=silence_motion)
        if adapt_steps > 0:  # each call adapts stage 1 to its caller (engine.adapt.LiveAdapter)
            self.base = self.base.with_(live_adapt=True, adapt_steps=adapt_steps, adapt_seconds=adapt_seconds)
        if steps is not None:
            self.base = self.base.with_(steps=steps, min_steps=min(self.base.min_steps, steps))
        self.default = model if model is not None else load_model(pack, device, avatar=avatar)
        from engine.model import check_region

        check_region(self.default, region, landmarks)
        self.default_name = None if avatar is None else Path(str(avatar)).name
        self.models: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self.trackers = TrackerPool(trackers)
        self.warm_s: float | None = None
        self.window_s: float | None = None

    @property
    def cfg(self):
        return self.config_for(self.default)

    def config_for(self, model: Any):
        from streaming.live import live_config

        return live_config(model, self.base)

    def warm(self, model: Any = None) -> None:
        """Warm `model` (default: the default model) with one short live run (blocking)."""
        from streaming.live import warm_up

        model = model or self.default
        self.trackers.wait_ready(30)
        lent = self.trackers.take()
        try:
            w = warm_up(model, self.config_for(model), tracker=lent)
        finally:
            if lent is not None:
                lent.close()
        if model is self.default:
            self.warm_s, self.window_s = w.seconds, w.window_s

    def _load_avatar(self, name: str):
        from engine.model import load_model
        from tccp.avatars.store import resolve_avatar

        folder = resolve_avatar(name, self.roots, allow_path=False)
        model = load_model(None, self.device, avatar=str(folder))
        try:
            self.warm(model)
        except Exception as exc:  # noqa: BLE001 - a cold model still works
            log.warning("avatar %s: warm-up failed: %r", name, exc)
        return model

    async def model_for(self, avatar: str | None = None):
        if not avatar or avatar == self.default_name:
            return self.default
        async with self._lock:  # one load per avatar, however many offers race
            if avatar not in self.models:
                loop = asyncio.get_running_loop()
                self.models[avatar] = await loop.run_in_executor(None, self._load_avatar, avatar)
            return self.models[avatar]

    async def __call__(self, avatar: str | None = None):
        from streaming.live import new_session

        model = await self.model_for(avatar)
        return new_session(model, self.config_for(model), tracker=self.trackers.take())

    def close(self) -> None:
        for m in [self.default, *self.models.values()]:
            m.close()
        self.trackers.close()


def model_session_factory(pack: str | None, device: str, steps: int | None = None, **kwargs: Any) -> ModelSessions:
    """Load the default model once; see `ModelSessions`."""
    return ModelSessions(pack, device, steps, **kwargs)


def set_threads(threads: int | None = None) -> int:
    """torch (intra-op) and OpenCV threads of the server; None: half the usable cores,
    1 to 4. Sessions already run in parallel threads (tracking, audio features,
    compositing, the model worker), so wide intra-op pools only fight them for cores."""
    import os

    if threads is None:
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = os.cpu_count() or 1
        threads = max(1, min(4, usable // 2))
    try:
        import torch

        torch.set_num_threads(threads)
    except Exception:  # noqa: BLE001 - torch is optional for --passthrough
        pass
    try:
        import cv2

        cv2.setNumThreads(threads)
    except Exception:  # noqa: BLE001
        pass
    return threads


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    if args.max_sessions < 1:
        raise TCCPError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if not 0 <= args.port <= 65535:
        raise TCCPError(f"--port must be 0..65535, got {args.port}")
    for name, v in (("--playout-delay", args.playout_delay), ("--max-delay", args.max_delay)):
        if v is not None and not 0.05 <= v <= 10:
            raise TCCPError(f"{name} {v}: must be between 0.05 and 10 seconds")
    if args.threads is not None and args.threads < 1:
        raise TCCPError(f"--threads {args.threads}: must be at least 1")
    from engine.adapt import check_adapt_options

    check_adapt_options(args.adapt_steps, args.adapt_seconds)
    from engine.model import check_silence_motion

    check_silence_motion(args.silence_motion)
    ctx = _ssl_context(args.cert, args.key)
    limit_malloc_arenas()  # before the model and any session thread exist (see trim_heap)
    threads = set_threads(args.threads)
    window_s = warm_s = None
    if args.passthrough:
        from streaming.passthrough import PassthroughSession

        factory, label = PassthroughSession, "passthrough"
    else:
        factory = model_session_factory(args.model, args.device, args.steps, avatar=args.avatar,
                                        mouth_scale=args.mouth_scale, landmarks=args.landmarks, region=args.region,
                                        trackers=args.max_sessions, adapt_steps=args.adapt_steps,
                                        adapt_seconds=args.adapt_seconds, silence_motion=args.silence_motion)
        label = "model"
        print(f"tccp serve: warming up the model ({threads} thread(s))...", flush=True)
        factory.warm()
        window_s, warm_s = factory.window_s, factory.warm_s
        print(f"tccp serve: warm in {warm_s:.1f} s; one window of work takes "
              + (f"{1000 * window_s:.0f} ms" if window_s else "? ms"), flush=True)
    default_avatar = None
    if args.avatar is not None:
        from tccp.avatars.store import valid_name

        default_avatar = args.avatar if valid_name(args.avatar) else Path(args.avatar).name
    cfg = ServerConfig(
        host=args.host, port=args.port, token=args.token, max_sessions=args.max_sessions,
        media_timeout_s=args.media_timeout, label=label, default_avatar=default_avatar,
        delay_s=args.playout_delay if args.playout_delay is not None or not args.passthrough else 0.1,
        max_delay_s=args.max_delay, window_s=window_s, warmup_s=warm_s,
    )
    freeze_startup_objects()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print("warning: listening beyond localhost without --token: anyone who can reach "
              "the port can use the model", flush=True)
    try:
        from streaming.eventloop import run as run_loop

        run_loop(serve(cfg, factory, ctx))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a server is meant to stop
    return 0
