"""``musetalk-rt send``: stream a WAV (or the microphone) to a live channel in real time.

Chunks are sent on a media clock: chunk ``k`` leaves at ``t0 + k × chunk`` (the loop sleeps
until that instant, so pacing errors do not accumulate). The server's ``stats`` are collected
as they arrive; an ``error`` from the server ends the run with its message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from musetalk_rt.errors import UserError
from musetalk_rt.media import AudioClip


@dataclass
class SendReport:
    """What a send did."""

    chunks: int = 0
    seconds: float = 0.0
    stats: list[dict] = field(default_factory=list)
    captions: list[dict] = field(default_factory=list)
    error: dict | None = None
    close_code: int | None = None


async def _connect(url: str, open_timeout_s: float, cafile: str | None):
    import ssl

    kwargs = {}
    if url.startswith("wss://"):
        try:
            kwargs["ssl"] = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"cannot read the CA file {cafile}: {exc}") from None
    try:
        return await connect(url, open_timeout=open_timeout_s, max_size=2**20, **kwargs)
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
        raise UserError(f"cannot connect to {url}: {exc}") from None


def _int16_chunks(clip: AudioClip, chunk_ms: int) -> tuple[list[bytes], float]:
    pcm = np.clip(np.rint(clip.samples.T * 32767.0), -32768, 32767).astype("<i2")  # [N, C]
    step = max(1, clip.sample_rate * chunk_ms // 1000)
    return [pcm[i : i + step].tobytes() for i in range(0, len(pcm), step)], step / clip.sample_rate


async def send_clip(
    url: str,
    clip: AudioClip,
    token: str | None = None,
    chunk_ms: int = 20,
    realtime: bool = True,
    on_message: Callable[[dict], None] | None = None,
    open_timeout_s: float = 10.0,
    cafile: str | None = None,
    sender: str | None = None,
) -> SendReport:
    """Send ``clip`` as ``pcm_s16le`` at its own rate and channel count.

    ``cafile`` trusts a certificate authority (or a self-signed certificate) for ``wss://``.
    ``sender``: this sender's id in the hello (a half-open connection of the same id gives way).

    Raises:
        UserError: The server cannot be reached, or refuses the hello (its message is given).
    """
    report = SendReport()
    chunks, chunk_s = _int16_chunks(clip, chunk_ms)
    hello = {
        "type": "hello",
        "token": token,
        "format": "pcm_s16le",
        "sample_rate": clip.sample_rate,
        "channels": clip.channels,
        **({"sender": sender} if sender else {}),
    }
    ws = await _connect(url, open_timeout_s, cafile)
    async with ws:
        await ws.send(json.dumps(hello))
        first = json.loads(await ws.recv())
        if first.get("type") != "ready":
            raise UserError(f"the server refused the sender: {first.get('message', first)}")

        async def reader():
            try:
                async for msg in ws:
                    m = json.loads(msg)
                    if m.get("type") == "stats":
                        report.stats.append(m)
                    elif m.get("type") == "caption":
                        report.captions.append(m)
                    elif m.get("type") == "error":
                        report.error = m
                    if on_message:
                        on_message(m)
            except ConnectionClosed:
                pass

        read_task = asyncio.create_task(reader())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            for k, data in enumerate(chunks):
                if realtime:
                    await asyncio.sleep(max(0.0, t0 + k * chunk_s - loop.time()))
                await ws.send(data)
                report.chunks += 1
            report.seconds = clip.num_samples / clip.sample_rate
            await ws.send(json.dumps({"type": "flush"}))
            await ws.send(json.dumps({"type": "bye"}))
            await asyncio.wait_for(read_task, timeout=10)
        except ConnectionClosed:
            pass
        finally:
            read_task.cancel()
        report.close_code = ws.close_code
    if report.error:
        raise UserError(f"the server stopped the sender: {report.error.get('message')}")
    return report


async def send_microphone(url: str, token: str | None = None, chunk_ms: int = 20) -> SendReport:
    """Stream the default microphone (16 kHz mono) until interrupted; needs ``sounddevice``."""
    try:
        import sounddevice
    except (ImportError, OSError):
        raise UserError(
            "--mic needs the sounddevice package and a microphone (pip install sounddevice); "
            "or use the browser page of the live process"
        ) from None
    report = SendReport()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=50)  # 1 s; a full queue drops, counted

    def callback(indata, frames, time_info, status):
        data = bytes(indata)
        loop.call_soon_threadsafe(lambda: queue.full() or queue.put_nowait(data))

    ws = await _connect(url, 10.0, None)
    async with ws:
        hello = {
            "type": "hello",
            "token": token,
            "format": "pcm_s16le",
            "sample_rate": 16000,
            "channels": 1,
        }
        await ws.send(json.dumps(hello))
        first = json.loads(await ws.recv())
        if first.get("type") != "ready":
            raise UserError(f"the server refused the sender: {first.get('message', first)}")
        block = 16000 * chunk_ms // 1000
        with sounddevice.RawInputStream(
            samplerate=16000, channels=1, dtype="int16", blocksize=block, callback=callback
        ):
            while True:
                await ws.send(await queue.get())
                report.chunks += 1
    return report
