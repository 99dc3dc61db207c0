"""The ingest protocol (README, "Live"): hello/ready handshake, formats, error codes, decoders.

A sender opens ``/ingest/<channel>`` and first sends a text message::

    {"type": "hello", "token": "…", "format": "pcm_s16le" | "f32le" | "opus",
     "sample_rate": 8000..48000, "channels": 1 | 2, "sender": "tab-3f9a…"}

``sender`` is optional (1-64 letters, digits, ``._-``): a sender that connects again with the
same id takes over its own connection that the server still holds half-open after a dropped
network, once that one has sent nothing for 5 s; anyone else is refused while it holds the
channel.

The server answers ``{"type": "ready", …}`` or ``{"type": "error", "code": …, "message": …}``
and closes with the same 44xx code. Then binary messages carry audio; text messages carry
control (``flush``, ``bye``); the server sends ``stats`` every second, which a sender must read
(a websockets client that never reads stops answering pings and is dropped after ~40 s). After a
``bye`` the server sends the session's last ``caption`` messages (its last utterance is cut at
the bye; up to 5 s for Groq), then closes.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass

import numpy as np

from musetalk_rt.audio.stream import MAX_RATE, MIN_RATE, pcm_to_float

FORMATS = ("pcm_s16le", "f32le", "opus")

# close codes (4000-4999 are for applications), mirrored in the error message's "code"
BAD_REQUEST = 4400  # malformed or missing hello, bad control message
UNAUTHORIZED = 4401  # wrong or missing token
NOT_FOUND = 4404  # no such channel
BUSY = 4409  # the channel already has a sender
UNSUPPORTED = 4415  # unknown format, sample rate or channel count
BAD_AUDIO = 4422  # audio that cannot be decoded
TIMEOUT = 4408  # no hello in time


class ProtocolError(Exception):
    """A refusal: sent to the client as an error message, then the connection is closed."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def as_message(self) -> str:
        return json.dumps({"type": "error", "code": self.code, "message": self.message})

    def close_reason(self) -> str:
        """The message cut to fit a close frame's reason (at most 123 bytes of UTF-8)."""
        return self.message.encode("utf-8", "replace")[:120].decode("utf-8", "ignore")


def shown(value: object, limit: int = 40) -> str:
    """A sender's value as an error message quotes it: repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tokens_match(given: object, expected: str | None) -> bool:
    """Constant-time token check; with no expected token every sender is accepted."""
    if expected is None:
        return True
    if not isinstance(given, str):
        return False
    # surrogatepass: a lone surrogate is valid JSON ("\ud800") but not UTF-8; it must be a
    # mismatch, not an exception
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


SENDER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Hello:
    """A validated hello."""

    format: str
    sample_rate: int
    channels: int
    sender: str | None = None  # the sender's own id (the browser page's, per tab), if it gave one


def parse_hello(message: str | bytes, expected_token: str | None) -> Hello:
    """Validate the first message of a sender.

    Raises:
        ProtocolError: Not a JSON hello, a wrong token, or an unsupported format.
    """
    if isinstance(message, bytes):
        raise ProtocolError(BAD_REQUEST, "the first message must be a text hello, not audio")
    try:
        hello = json.loads(message)
    except (ValueError, RecursionError):  # (a hostile hello nested thousands deep)
        raise ProtocolError(BAD_REQUEST, "the hello is not valid JSON") from None
    if not isinstance(hello, dict) or hello.get("type") != "hello":
        raise ProtocolError(BAD_REQUEST, 'the first message must be {"type": "hello", …}')
    if not tokens_match(hello.get("token"), expected_token):
        raise ProtocolError(UNAUTHORIZED, "wrong or missing token")
    fmt = hello.get("format", "pcm_s16le")
    if fmt not in FORMATS:
        raise ProtocolError(UNSUPPORTED, f"format {shown(fmt)} is not one of {', '.join(FORMATS)}")
    rate, channels = hello.get("sample_rate"), hello.get("channels", 1)
    if not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise ProtocolError(
            UNSUPPORTED,
            f"sample_rate {shown(rate)} must be an integer from {MIN_RATE} to {MAX_RATE}",
        )
    if isinstance(channels, bool) or not isinstance(channels, int) or channels not in (1, 2):
        raise ProtocolError(UNSUPPORTED, f"channels {shown(channels)} must be 1 or 2")
    sender = hello.get("sender")
    if sender is not None and (not isinstance(sender, str) or not SENDER_ID.fullmatch(sender)):
        raise ProtocolError(BAD_REQUEST, "sender must be 1-64 letters, digits, '.', '_' or '-'")
    if fmt == "opus" and rate not in (8000, 12000, 16000, 24000, 48000):
        raise ProtocolError(UNSUPPORTED, "opus needs a sample rate of 8, 12, 16, 24 or 48 kHz")
    return Hello(fmt, rate, channels, sender)


class AudioDecoder:
    """Binary messages of one sender -> ``[N, C]`` float32 at the hello's rate."""

    def __init__(self, hello: Hello):
        self.hello = hello
        self._opus = None
        if hello.format == "opus":
            import av

            ctx = av.CodecContext.create("opus", "r")
            ctx.sample_rate = hello.sample_rate
            ctx.layout = "stereo" if hello.channels == 2 else "mono"
            self._opus = ctx

    def decode(self, data: bytes) -> tuple[np.ndarray, int]:
        """Decode one message to ``([N, C] float32, sample rate)``.

        Raises:
            ProtocolError: Audio that cannot be decoded (a torn PCM frame, not an opus packet).
        """
        if self._opus is None:
            try:
                return pcm_to_float(data, self.hello.format, self.hello.channels), (
                    self.hello.sample_rate
                )
            except ValueError as exc:
                raise ProtocolError(BAD_AUDIO, str(exc)) from None
        import av

        try:
            frames = self._opus.decode(av.Packet(data))
        except (av.FFmpegError, ValueError) as exc:
            raise ProtocolError(BAD_AUDIO, f"not an opus packet ({exc})") from None
        parts, rate = [], self.hello.sample_rate
        for f in frames:  # the decoder picks its output rate (48 kHz) and sample format
            a = f.to_ndarray()
            a = a.T if f.format.is_planar else a.reshape(-1, len(f.layout.channels))
            if f.format.name.startswith("s16"):
                a = a.astype(np.float32) / 32768.0
            parts.append(a.astype(np.float32)[:, : self.hello.channels])
            rate = f.sample_rate
        if not parts:
            return np.zeros((0, self.hello.channels), np.float32), rate
        return np.concatenate(parts), rate
