"""The two fixes of the 60 s load run (docs/streaming.md): `tccp serve` runs on uvloop,
and a call's UDP sockets get wide receive buffers. The 60 s load run itself is
`TCCP_LOAD_SECONDS=60 .venv/bin/python -m pytest -q tests/test_webrtc_load.py`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from streaming.eventloop import loop_name, run


def test_run_uses_uvloop_when_installed():
    pytest.importorskip("uvloop")

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert loop_name() == "uvloop"
    assert run(which()).startswith("uvloop")


def test_call_sockets_get_wide_receive_buffers():
    pytest.importorskip("aiortc")
    from aiortc import RTCPeerConnection

    from streaming.peer import UDP_BUFFER_BYTES, widen_udp_buffers

    rmem_max = Path("/proc/sys/net/core/rmem_max")
    cap = int(rmem_max.read_text()) if rmem_max.exists() else None

    async def go() -> tuple[int, list[int]]:
        pc = RTCPeerConnection()
        try:
            pc.addTransceiver("video")
            pc.addTransceiver("audio")
            await pc.setLocalDescription(await pc.createOffer())  # gathers: sockets exist
            n = widen_udp_buffers(pc)
            sizes = []
            for t in pc.getTransceivers():
                conn = t.sender.transport.transport._connection
                for proto in conn._protocols:
                    sock = proto.transport.get_extra_info("socket")
                    sizes.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
            return n, sizes
        finally:
            await pc.close()

    n, sizes = run(go())
    assert n > 0 and sizes
    if cap is not None:  # Linux reports twice the granted size; the grant is capped at net.core.rmem_max
        assert min(sizes) >= min(UDP_BUFFER_BYTES, cap)
