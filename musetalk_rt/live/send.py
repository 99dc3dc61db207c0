"""``musetalk-rt send``: stream a WAV (or the microphone) to a live channel in real time.

Chunks are sent on a media clock: chunk ``k`` leaves at ``t0 + k × chunk`` (the loop sleeps
until that instant, so pacing errors do not accumulate). The server's messages are read all
along (``stats`` every second; a client that stops reading stops answering pings and is
dropped); an ``error`` or a 44xx close from the server ends the run with its message. The
microphone's blocks reach the network through a queue of 1 s: beyond it, new blocks are dropped
and counted; Ctrl-C sends ``flush`` and ``bye`` and ends with the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidURI

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
    dropped: int = 0  # microphone blocks dropped while the network stalled
    interrupted: bool = False  # ended by Ctrl-C (the microphone's normal end)


BYE_TIMEOUT_S = 10.0  # after bye, how long the server may take to play out and close


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
        why = str(exc)
        if not why:  # a reset or a timeout says nothing of itself
            why = type(exc).__name__
            if isinstance(exc, TimeoutError):
                why = f"no answer in {open_timeout_s:g} s"
            elif isinstance(exc, ConnectionResetError):
                why = "the server reset the connection"
        # TLS and plain HTTP crossed: the server resets, never answers, or answers garbage
        crossed = isinstance(
            exc, ConnectionError | TimeoutError | ssl.SSLError | InvalidMessage
        ) and not isinstance(exc, ConnectionRefusedError | ssl.SSLCertVerificationError)
        if crossed and url.startswith("wss://"):
            why += "; does the server speak TLS? A live process does with --cert; else use ws://"
        elif crossed:
            why += "; if the live process was started with --cert, use wss://"
        raise UserError(f"cannot connect to {url}: {why}") from None


def _int16_chunks(clip: AudioClip, chunk_ms: int) -> tuple[list[bytes], float]:
    pcm = np.clip(np.rint(clip.samples.T * 32767.0), -32768, 32767).astype("<i2")  # [N, C]
    step = max(1, clip.sample_rate * chunk_ms // 1000)
    return [pcm[i : i + step].tobytes() for i in range(0, len(pcm), step)], step / clip.sample_rate


async def _session(
    url: str,
    hello: dict,
    chunks: AsyncIterator[bytes],
    report: SendReport,
    on_message: Callable[[dict], None] | None,
    open_timeout_s: float,
    cafile: str | None,
    stop_on_cancel: bool = False,
) -> SendReport:
    """Hello, then ``chunks`` as binary messages while a reader takes every server message.

    The reader matters as much as the sending: a client that stops reading stops answering the
    server's pings once its receive queue is full (16 stats messages, ~16 s), and the server
    drops it. The end — the source exhausted, or the task cancelled (Ctrl-C) — sends ``flush``
    and ``bye``, so the server plays out what it holds. With ``stop_on_cancel`` a cancel is
    the normal end (the microphone's Ctrl-C): the report comes back, marked ``interrupted``.
    """
    ws = await _connect(url, open_timeout_s, cafile)
    async with ws:
        await ws.send(json.dumps(hello))
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), open_timeout_s))
        except ConnectionClosed as exc:
            raise UserError(f"the server closed the connection before ready ({exc})") from None
        except TimeoutError:
            raise UserError(f"no reply to the hello from {url} in {open_timeout_s:g} s") from None
        except ValueError:
            raise UserError(f"{url} replied to the hello with something that is not JSON") from None
        if first.get("type") != "ready":
            raise UserError(f"the server refused the sender: {first.get('message', first)}")

        async def reader():
            try:
                async for msg in ws:
                    if not isinstance(msg, str):
                        continue
                    try:
                        m = json.loads(msg)
                    except ValueError:
                        continue
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
        try:
            async for data in chunks:
                await ws.send(data)
                report.chunks += 1
            await _goodbye(ws)
            await asyncio.wait_for(asyncio.shield(read_task), timeout=BYE_TIMEOUT_S)
        except asyncio.CancelledError:  # Ctrl-C: let the server play out what it holds
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await asyncio.wait_for(_goodbye(ws), timeout=1.0)
            if not stop_on_cancel:
                raise
            report.interrupted = True
        except ConnectionClosed:  # the server closed: its error message may still be queued
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(read_task), timeout=2.0)
        except TimeoutError:  # no close after bye: we close (the exit below)
            pass
        finally:
            read_task.cancel()
        report.close_code = ws.close_code
    if report.error:
        raise UserError(f"the server stopped the sender: {report.error.get('message')}")
    if report.close_code is not None and 4400 <= report.close_code < 4500:
        raise UserError(f"the server stopped the sender (close code {report.close_code})")
    return report


async def _goodbye(ws) -> None:
    await ws.send(json.dumps({"type": "flush"}))
    await ws.send(json.dumps({"type": "bye"}))


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
        UserError: The server cannot be reached, refuses the hello, or stops the sender (its
            message is given).
    """
    report = SendReport()
    pieces, chunk_s = _int16_chunks(clip, chunk_ms)
    hello = {
        "type": "hello",
        "token": token,
        "format": "pcm_s16le",
        "sample_rate": clip.sample_rate,
        "channels": clip.channels,
        **({"sender": sender} if sender else {}),
    }

    async def paced() -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for k, data in enumerate(pieces):
            if realtime:  # chunk k leaves at t0 + k × chunk: errors do not accumulate
                await asyncio.sleep(max(0.0, t0 + k * chunk_s - loop.time()))
            yield data
        report.seconds = clip.num_samples / clip.sample_rate

    return await _session(url, hello, paced(), report, on_message, open_timeout_s, cafile)


async def send_microphone(
    url: str,
    token: str | None = None,
    chunk_ms: int = 20,
    on_message: Callable[[dict], None] | None = None,
    cafile: str | None = None,
) -> SendReport:
    """Stream the default microphone (16 kHz mono) until interrupted; needs ``sounddevice``.

    The audio callback hands blocks to the event loop through a queue of 1 s; when the network
    stalls longer, new blocks are dropped and counted (``report.dropped``), never queued without
    bound. Ctrl-C ends with ``flush`` and ``bye``.
    """
    try:
        import sounddevice
    except (ImportError, OSError):
        raise UserError(
            "--mic needs the sounddevice package and a microphone (pip install sounddevice); "
            "or use the browser page of the live process"
        ) from None
    report = SendReport()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max(1, 1000 // chunk_ms))  # 1 s

    def put(data: bytes) -> None:
        if queue.full():
            report.dropped += 1
        else:
            queue.put_nowait(data)

    def callback(indata, frames, time_info, status):
        data = bytes(indata)
        loop.call_soon_threadsafe(put, data)

    async def blocks() -> AsyncIterator[bytes]:
        block = 16000 * chunk_ms // 1000
        t0 = loop.time()
        try:
            with sounddevice.RawInputStream(
                samplerate=16000, channels=1, dtype="int16", blocksize=block, callback=callback
            ):
                while True:
                    yield await queue.get()
        finally:
            report.seconds = loop.time() - t0

    hello = {"type": "hello", "token": token, "format": "pcm_s16le", "sample_rate": 16000}
    hello["channels"] = 1
    return await _session(
        url, hello, blocks(), report, on_message, 10.0, cafile, stop_on_cancel=True
    )
