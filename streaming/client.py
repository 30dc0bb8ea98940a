"""A scriptable WebRTC client for `tccp serve` (aiortc): clip in, edited frames out.

What a browser does, without a browser: send a clip's frames and audio in real time,
negotiate through `POST /offer`, and collect what comes back. Used by the end-to-end
tests and handy for load checks (`N` clients at once) from a terminal.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["ClipVideoTrack", "ClipAudioTrack", "Received", "post_offer", "connect", "OfferRefused"]


class OfferRefused(Exception):
    """The server answered the offer with an HTTP error (`status`, `body`)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def _paced_track(kind: str, at_s: Callable[[int], float], ended: Callable[[int], bool], make: Callable[[int], Any],
                 on_start: Callable[[float], None] | None = None):
    """An aiortc track whose `recv` returns item i = `make(i)` (i = 0, 1, ...) at
    `at_s(i)` seconds after the first request (real-time pacing), and ends when
    `ended(i)`; `on_start(t0)` gets the monotonic time of the first request."""
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class _PacedTrack(MediaStreamTrack):
        def __init__(self) -> None:
            super().__init__()
            self.sent = 0
            self._start: float | None = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            if self._start is None:
                self._start = time.monotonic()
                if on_start is not None:
                    on_start(self._start)
            i = self.sent
            if ended(i):
                self.stop()
                raise MediaStreamError
            wait = self._start + at_s(i) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            frame = make(i)
            self.sent += 1
            return frame

    _PacedTrack.kind = kind
    return _PacedTrack()


def ClipVideoTrack(frames: np.ndarray, fps: float = 25.0, loop: bool = True, *,  # noqa: N802
                   image: Callable[[int], np.ndarray] | None = None, restart_pts: bool = False,
                   on_send: Callable[[], None] | None = None):
    """Video track that plays `(N, H, W, 3)` uint8 RGB frames in real time.

    For measuring peers (`streaming.probe`): `image(i)` makes the i-th sent picture
    (default: the clip's frame), `restart_pts` restarts the timestamps with each loop
    of the clip (a camera whose clock jumps back), `on_send()` is called as each frame
    leaves."""
    import av

    n = len(frames)

    def make(i: int):
        vf = av.VideoFrame.from_ndarray(frames[i % n] if image is None else image(i), format="rgb24")
        vf.pts = int(round(((i % n) if restart_pts else i) * 90000 / fps))
        vf.time_base = fractions.Fraction(1, 90000)
        if on_send is not None:
            on_send()
        return vf

    return _paced_track("video", lambda i: i / fps, lambda i: i >= n and not loop, make)


def ClipAudioTrack(samples: np.ndarray, sr: int = 48000, loop: bool = True, ptime: float = 0.02, *,  # noqa: N802
                   restart_pts: bool = False, on_start: Callable[[float], None] | None = None):
    """Audio track that plays mono float32 `samples` at `sr` in 20 ms s16 frames
    (`restart_pts`: timestamps restart with each loop; `on_start(t0)`: the monotonic
    time the first frame was asked for, the track's time origin)."""
    import av

    pcm = (np.clip(np.asarray(samples, np.float32), -1, 1) * 32767).astype(np.int16)
    block = int(sr * ptime)

    def make(i: int):
        n0 = i * block
        chunk = pcm[np.arange(n0, n0 + block) % pcm.size] if pcm.size else np.zeros(block, np.int16)
        af = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        af.sample_rate = sr
        af.pts = (n0 % max(1, pcm.size)) if restart_pts else n0
        af.time_base = fractions.Fraction(1, sr)
        return af

    return _paced_track("audio", lambda i: i * block / sr, lambda i: i * block >= pcm.size and not loop, make,
                        on_start)


@dataclass
class Received:
    """What came back from the server."""

    frames: int = 0
    sizes: set = field(default_factory=set)
    first_at: float | None = None
    last_frame: np.ndarray | None = None
    audio_frames: int = 0
    stats: list = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    want: int = 0

    async def consume(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "audio":
                self.audio_frames += 1
                continue
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.frames += 1
            self.sizes.add((frame.width, frame.height))
            if self.want and self.frames >= self.want:
                self.last_frame = frame.to_ndarray(format="rgb24")
                self.done.set()


async def post_offer(url: str, offer: dict, token: str | None = None, timeout: float = 30.0) -> dict:
    """POST an offer to `url` (.../offer); the answer dict, or raise `OfferRefused`."""
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.post(url, data=json.dumps(offer), headers=headers) as resp:
            text = await resp.text()
            try:
                body = json.loads(text)
            except json.JSONDecodeError:
                body = text
            if resp.status != 200:
                raise OfferRefused(resp.status, body)
            return body


async def connect(
    base_url: str,
    video_track,
    audio_track=None,
    token: str | None = None,
    want_frames: int = 0,
):
    """Open a peer connection to `tccp serve`; returns `(pc, received, answer)`.

    `received.done` is set once `want_frames` video frames came back. The caller owns
    `pc` (close it, or drop its transport to simulate a vanished peer).
    """
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    received = Received(want=want_frames)
    channel = pc.createDataChannel("stats", ordered=False, maxRetransmits=0)

    @channel.on("message")
    def _on_stats(msg) -> None:
        try:
            received.stats.append(json.loads(msg))
        except (TypeError, ValueError):
            pass

    @pc.on("track")
    def _on_track(track) -> None:
        asyncio.ensure_future(received.consume(track))

    pc.addTrack(video_track)
    if audio_track is not None:
        pc.addTrack(audio_track)
    await pc.setLocalDescription(await pc.createOffer())
    try:
        answer = await post_offer(
            base_url.rstrip("/") + "/offer",
            {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type},
            token=token,
        )
    except BaseException:
        await pc.close()
        raise
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return pc, received, answer
