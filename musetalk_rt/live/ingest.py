"""WebSocket audio ingest: one sender per channel, validated, paced, never able to hurt the show.

Each connection to ``/ingest/<channel>`` must open with a hello (:mod:`.protocol`); the token is
compared in constant time; a second sender on a busy channel is refused with the reason.
Audio messages are decoded, resampled to 16 kHz mono by a streaming resampler
(:class:`~musetalk_rt.audio.stream.AudioInput`) and handed to the channel's :class:`AudioSink`,
whose ``push`` must return at once (the heavy work runs elsewhere). A sender that runs ahead of
real time by more than ``max_ahead_s`` is paced: the server stops reading until the wall clock
catches up, so TCP back-pressure slows the sender and nothing piles up. Every second the sender
receives ``stats``. Any bad message gets an error and a close for that connection only.

The same port answers plain HTTP: ``/healthz`` (``ok``; with the owner's check, JSON that is 503
when the show is stalled), ``/metrics`` (Prometheus text, when the owner provides it),
``/channels.json``, the operator preview (``/preview``: each channel's latest frame, polled as
JPEG) and the browser ingest page (``/``: microphone -> AudioWorklet -> PCM16 16 kHz -> this
WebSocket, with a level meter, connection state and live latency, in Traditional Chinese and
English).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response
from websockets.protocol import State

from musetalk_rt.audio.features import SAMPLE_RATE
from musetalk_rt.audio.stream import AudioInput
from musetalk_rt.live.protocol import (
    BAD_REQUEST,
    BUSY,
    NOT_FOUND,
    TIMEOUT,
    AudioDecoder,
    ProtocolError,
    parse_hello,
    shown,
)

log = logging.getLogger("musetalk_rt.ingest")
WEB = Path(__file__).parent / "web"
_PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/worklet.js": ("worklet.js", "text/javascript; charset=utf-8"),
    "/preview": ("preview.html", "text/html; charset=utf-8"),
}


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


class AudioSink(Protocol):
    """Where a channel's 16 kHz mono audio goes (``push`` must not block)."""

    def open_session(self) -> None: ...

    def push(self, audio_16k: np.ndarray) -> None: ...

    def close_session(self) -> None: ...

    def sender_stats(self) -> dict: ...


@dataclass
class IngestConfig:
    """Ingest settings (loopback and an ephemeral port suit tests; live passes its own)."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_message_bytes: int = 256 * 1024  # ~1.4 s of 48 kHz stereo s16 per message
    hello_timeout_s: float = 5.0
    stats_interval_s: float = 1.0
    max_ahead_s: float = 1.0
    ssl_context: ssl.SSLContext | None = None
    # a hello for a channel whose sender is still leaving (its connection closing) waits this
    # long for the channel before it is refused as a second sender
    busy_grace_s: float = 1.0
    # a sender that has sent nothing for this long gives way when the *same* sender (its hello's
    # ``sender`` id: the browser page's, per tab) connects again: a dropped network leaves its
    # connection half-open until the pings time out (~40 s), and the reconnecting page would be
    # refused meanwhile as a second sender. Another sender is refused as before.
    stale_sender_s: float = 5.0
    # after a sender's bye, how long the server waits for the session's last messages (the
    # caption of its last utterance, a Groq call away) before it closes; ``send`` waits 10 s
    bye_linger_s: float = 5.0


class IngestServer:
    """The ``/ingest/<channel>`` WebSocket server.

    Args:
        sinks: Channel name -> its audio sink.
        config: Address, token, limits.
    """

    def __init__(
        self,
        sinks: dict[str, AudioSink],
        config: IngestConfig | None = None,
        metrics: Callable[[], str] | None = None,
        preview: Callable[[str], bytes | None] | None = None,
        health: Callable[[], tuple[bool, dict]] | None = None,
    ):
        self.sinks = sinks
        self.config = config or IngestConfig()
        self.metrics = metrics
        self.preview = preview  # channel name -> JPEG of its latest frame
        self.health = health  # -> (serving, details): /healthz is 503 when not serving
        self._busy: dict[str, float] = {}  # channel -> connect time
        self._left: dict[str, asyncio.Event] = {}  # channel -> set when its sender has left
        self._active: dict[str, tuple[ServerConnection, dict]] = {}  # channel -> (conn, state)
        self._starts: dict[str, int] = {}  # channel -> sessions begun (a bye's wait ends at one)
        self._server = None
        self.refused: dict[int, int] = {}  # close code -> count

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> IngestServer:
        cfg = self.config
        self._server = await serve(
            self._handle,
            cfg.host,
            cfg.port,
            max_size=cfg.max_message_bytes,
            process_request=self._http,
            ssl=cfg.ssl_context,
            # no permessage-deflate: PCM hardly compresses, and at 16 channels on an H200 the
            # event loop was inflating senders' audio in 22% of a thread profile's samples
            # (experiments/LOG.md, 2026-12-02 afternoon)
            compression=None,
        )
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> IngestServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _http(self, connection: ServerConnection, request):
        path = request.path.split("?", 1)[0]
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None  # go on with the WebSocket handshake
        if path == "/healthz":
            if self.health is None:  # the ingest alone: its event loop answers, that is all
                return _response(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
            try:
                serving, details = self.health()
            except Exception as exc:  # a broken check is not a healthy process
                serving, details = False, {"status": "error", "error": type(exc).__name__}
            status = HTTPStatus.OK if serving else HTTPStatus.SERVICE_UNAVAILABLE
            return _response(status, json.dumps(details).encode(), "application/json")
        if path == "/metrics" and self.metrics is not None:
            return _response(
                HTTPStatus.OK, self.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8"
            )
        if path == "/channels.json":
            body = json.dumps({"channels": sorted(self.sinks)}).encode()
            return _response(HTTPStatus.OK, body, "application/json")
        if path.startswith("/preview/") and path.endswith(".jpg") and self.preview:
            jpeg = self.preview(unquote(path[len("/preview/") : -len(".jpg")]))
            if jpeg is not None:
                return _response(HTTPStatus.OK, jpeg, "image/jpeg")
        if path in _PAGES:
            name, ctype = _PAGES[path]
            return _response(HTTPStatus.OK, (WEB / name).read_bytes(), ctype)
        return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    async def _refuse(self, conn: ServerConnection, err: ProtocolError) -> None:
        self.refused[err.code] = self.refused.get(err.code, 0) + 1
        log.info("refused a sender on %s: %s (%d)", conn.request.path, err.message, err.code)
        try:
            await conn.send(err.as_message())
            await conn.close(err.code, err.close_reason())
        except ConnectionClosed:
            pass

    async def _handle(self, conn: ServerConnection) -> None:
        path = conn.request.path
        # a channel named in Chinese arrives percent-encoded (the page's encodeURIComponent)
        name = unquote(path[len("/ingest/") :]) if path.startswith("/ingest/") else None
        try:
            if not name or name not in self.sinks:
                raise ProtocolError(
                    NOT_FOUND, f"no channel at {path}; channels: {', '.join(sorted(self.sinks))}"
                )
            try:
                first = await asyncio.wait_for(conn.recv(), self.config.hello_timeout_s)
            except TimeoutError:
                raise ProtocolError(TIMEOUT, "no hello within the timeout") from None
            hello = parse_hello(first, self.config.token)
            if name in self._busy:  # a reconnecting sender may find its old session ending
                await self._sender_left(name, self.config.busy_grace_s)
            if name in self._busy and self._replace_stale(name, hello.sender):
                await self._sender_left(name, 5.0)
            if name in self._busy:
                since = time.strftime("%H:%M:%S", time.localtime(self._busy[name]))
                raise ProtocolError(BUSY, f"channel {name!r} already has a sender (since {since})")
        except ProtocolError as err:
            await self._refuse(conn, err)
            return
        except ConnectionClosed:
            return
        self._busy[name] = time.time()  # no await since the check above: no one else got in
        self._starts[name] = self._starts.get(name, 0) + 1
        self._left[name] = asyncio.Event()
        try:
            bye = await self._session(conn, name, hello)
        finally:
            self._busy.pop(name, None)
            self._left[name].set()
        if bye:  # the channel is free already: a sender may start again meanwhile
            with contextlib.suppress(ConnectionClosed):
                await self._last_messages(conn, name)
                await conn.close(1000, "bye")

    async def _sender_left(self, name: str, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the channel's sender to leave."""
        left = self._left.setdefault(name, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(left.wait(), timeout_s)

    def _replace_stale(self, name: str, sender: str | None) -> bool:
        """End the channel's sender if it is ``sender`` again and has sent nothing for a while.

        Returns:
            Whether it was ended (its session then closes as if it had left).
        """
        old = self._active.get(name)
        if old is None:
            return False
        conn, state = old
        silent_s = time.monotonic() - state["last_message"]
        if sender is None or state.get("sender") != sender:
            return False
        if silent_s < self.config.stale_sender_s:
            return False
        log.warning(
            "sender on %s sent nothing for %.0f s (a dropped network?): replaced by itself, "
            "connecting again",
            name,
            silent_s,
        )
        with contextlib.suppress(Exception):  # a half-open peer never answers a close
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        return True

    async def _session(self, conn: ServerConnection, name: str, hello) -> bool:
        """Audio and control from one sender until it leaves.

        Returns:
            Whether it ended with a ``bye`` (the connection is then still open, for
            :meth:`_last_messages`).
        """
        sink = self.sinks[name]
        decoder = AudioDecoder(hello)
        audio_in = AudioInput(hello.sample_rate, hello.channels)
        state = {
            "received_s": 0.0,
            "paced_s": 0.0,
            "messages": 0,
            "last_message": time.monotonic(),
            "sender": hello.sender,
        }
        self._active[name] = (conn, state)
        t0 = time.monotonic()
        stats_task = msg_task = None
        bye = False
        sink.open_session()
        try:  # from here on the session is closed however it ends (a sender gone before ready)
            await conn.send(
                json.dumps(
                    {
                        "type": "ready",
                        "channel": name,
                        "sample_rate": SAMPLE_RATE,
                        "stats_interval_s": self.config.stats_interval_s,
                    }
                )
            )
            log.info("sender on %s: %s", name, hello)
            stats_task = asyncio.create_task(self._stats_loop(conn, sink, audio_in, state, t0))
            take = getattr(sink, "take_messages", None)  # e.g. captions, for the sender to show
            msg_task = asyncio.create_task(self._message_loop(conn, take)) if take else None
            async for msg in conn:
                state["last_message"] = time.monotonic()
                if isinstance(msg, bytes):
                    samples, rate = decoder.decode(msg)
                    pcm = audio_in.push(samples, sample_rate=rate, channels=hello.channels)
                    sink.push(pcm)
                    state["messages"] += 1
                    state["received_s"] += samples.shape[0] / rate
                    ahead = state["received_s"] - (time.monotonic() - t0)
                    if ahead > self.config.max_ahead_s:  # faster than real time: pace it
                        wait = ahead - self.config.max_ahead_s
                        state["paced_s"] += wait
                        await asyncio.sleep(wait)
                    continue
                try:
                    ctl = json.loads(msg)
                except ValueError:
                    ctl = None
                kind = ctl.get("type") if isinstance(ctl, dict) else None
                if kind == "flush":
                    sink.push(audio_in.flush())
                elif kind == "bye":
                    bye = True
                    break
                else:  # the protocol's rule: a bad message gets an error and a close
                    raise ProtocolError(BAD_REQUEST, f"unknown control message {shown(msg)}")
        except ProtocolError as err:
            await self._refuse(conn, err)
        except ConnectionClosed:
            pass
        finally:
            for task in (stats_task, msg_task):
                if task is not None:
                    task.cancel()
            with contextlib.suppress(Exception):  # the resampler's last ~20 ms are still
                sink.push(audio_in.flush())  # its audio (a sender gone without bye too)
            sink.close_session()  # (after a bye its last utterance is cut now)
            if self._active.get(name, (None,))[0] is conn:
                del self._active[name]
            log.info("sender on %s left after %.1f s of audio", name, state["received_s"])
        return bye

    async def _last_messages(self, conn: ServerConnection, name: str) -> None:
        """After a bye, the session's last messages (its last utterance's caption).

        Waits while the sink may still give one — up to ``bye_linger_s``, while the
        connection is open and no new session has begun on the channel (the sink's messages
        would then be that session's) — then sends what it gave. A sink without messages:
        nothing.
        """
        sink = self.sinks[name]
        pending = getattr(sink, "messages_pending", None)
        take = getattr(sink, "take_messages", None)
        if take is None or pending is None:
            return
        deadline = time.monotonic() + self.config.bye_linger_s
        starts = self._starts.get(name)
        while (
            pending()
            and conn.state is State.OPEN
            and self._starts.get(name) == starts
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
        if self._starts.get(name) == starts:
            await self._send_messages(conn, take())

    @staticmethod
    async def _send_messages(conn: ServerConnection, messages: list[dict]) -> None:
        for m in messages:
            await conn.send(json.dumps(m, ensure_ascii=False))

    async def _message_loop(self, conn, take: Callable[[], list[dict]]) -> None:
        try:
            while True:
                await asyncio.sleep(0.1)
                await self._send_messages(conn, take())
        except (ConnectionClosed, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("messages for a sender failed")

    async def _stats_loop(self, conn, sink, audio_in, state, t0) -> None:
        try:
            while True:
                await asyncio.sleep(self.config.stats_interval_s)
                elapsed = time.monotonic() - t0
                await conn.send(
                    json.dumps(
                        {
                            "type": "stats",
                            "received_s": round(state["received_s"], 3),
                            "ahead_s": round(state["received_s"] - elapsed, 3),
                            "paced_s": round(state["paced_s"], 3),
                            "messages": state["messages"],
                            "input": audio_in.stats.as_dict(),
                            **sink.sender_stats(),
                        }
                    )
                )
        except (ConnectionClosed, asyncio.CancelledError):
            pass
        except Exception:  # a broken stats source must not end the session silently
            log.exception("stats for a sender failed")


class RecordingSink:
    """An :class:`AudioSink` that keeps what it receives (tests and dry runs).

    Args:
        max_s: Keep at most this much audio (older audio is dropped and counted).
    """

    def __init__(self, max_s: float = 600.0):
        self.max_samples = int(max_s * SAMPLE_RATE)
        self._parts: list[np.ndarray] = []
        self._n = 0
        self.dropped = 0
        self.sessions = 0
        self.open = False

    def open_session(self) -> None:
        self.sessions += 1
        self.open = True

    def push(self, audio_16k: np.ndarray) -> None:
        if audio_16k.size:
            self._parts.append(audio_16k)
            self._n += audio_16k.size
            while self._n > self.max_samples and self._parts:
                self._n -= self._parts[0].size
                self.dropped += self._parts.pop(0).size

    def close_session(self) -> None:
        self.open = False

    def sender_stats(self) -> dict:
        return {"buffered_s": round(self._n / SAMPLE_RATE, 3)}

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)
