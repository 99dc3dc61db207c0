"""Groq speech calls through the official ``groq`` client, inside a time budget.

The client's own retries are switched off (``max_retries=0``): it would honour a ``retry-after``
of up to a minute, far beyond our budget. Instead every call gets a deadline: its timeout is
the smaller of the call's own and the time left, a 429's ``retry-after`` is waited for only if
it fits, and 5xx, timeouts and connection errors are retried with a short backoff while time
remains. Anything else (401, 400, a malformed body) fails at once.

The client's timeout bounds each network step (connect, each read), not a whole call: a reply
that trickles in could take several times the budget. So each call also runs under a wall
clock (:func:`_within`): past its time it counts as timed out and its reply, if it comes, is
thrown away; the start-up line's "at most" holds.

The API key comes from ``GROQ_API_KEY`` and never appears in a log, an error or a metric:
error text from the service is not passed on (only the status and the error type), and
:func:`install_redaction` scrubs the key from every log record as a second line of defence.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from musetalk_rt.errors import UserError
from musetalk_rt.speech.config import GroqConfig
from musetalk_rt.speech.utterances import wav_bytes

log = logging.getLogger("musetalk_rt.groq")
SAMPLE_RATE = 16000


class GroqUnavailable(Exception):
    """A Groq call failed within its budget (the reason holds no secret)."""


class _OverTime(Exception):
    """A call ran past its wall-clock time."""


def _within(fn, timeout_s: float):
    """``fn()`` on a thread of its own, waited for at most ``timeout_s`` seconds.

    Raises:
        _OverTime: It had not returned by then (the thread is left to finish; its result is
            dropped; the client's own per-step timeouts end it).
    """
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["out"] = fn()
        except BaseException as exc:  # handed to the caller
            box["exc"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="groq call", daemon=True).start()
    if not done.wait(timeout_s):
        raise _OverTime
    if "exc" in box:
        raise box["exc"]
    return box["out"]


@dataclass
class Timings:
    """Seconds spent per call of one utterance (None: not called)."""

    stt_s: float | None = None
    chat_s: float | None = None
    tts_s: float | None = None
    retries: int = 0


_SECRETS: set[str] = set()
_factory_installed = False


def _scrub(record: logging.LogRecord) -> None:
    """Replace every registered secret in a record's message and exception text with ``***``."""
    try:
        msg = record.getMessage()
    except Exception:  # a malformed record: leave it to the logging machinery
        return
    exc_text = None
    if record.exc_info:
        exc_text = logging.Formatter().formatException(record.exc_info)
    for secret in _SECRETS:
        if secret in msg:
            msg = msg.replace(secret, "***")
        if exc_text and secret in exc_text:
            record.exc_info = None
            record.exc_text = exc_text.replace(secret, "***")
    record.msg, record.args = msg, None


def install_redaction(secret: str) -> None:
    """Scrub ``secret`` from every log record created from now on, whichever handler gets it.

    The record factory runs when a record is made, so handlers added later (a test's capture,
    a notebook's) and propagated records are covered too.
    """
    global _factory_installed
    if not secret:
        return
    _SECRETS.add(secret)
    if _factory_installed:
        return
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make(*args, **kwargs)
        _scrub(record)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def _read_wav(data: bytes) -> np.ndarray:
    """Groq's WAV reply as 16 kHz mono float32 (PyAV reads any WAV flavour)."""
    from musetalk_rt.media import decode_audio_bytes

    audio = decode_audio_bytes(data, SAMPLE_RATE)
    if not audio.size:
        raise ValueError("no audio in the speech reply")
    return audio


class GroqSpeech:
    """Transcription, rewrite and speech, each within a deadline.

    Args:
        config: Models, timeouts, retries.
        api_key: The key (default: ``GROQ_API_KEY``).
    """

    def __init__(self, config: GroqConfig, api_key: str | None = None):
        try:
            import groq
        except ImportError:
            raise UserError(
                "--groq needs the groq client: pip install 'musetalk-rt[groq]'"
            ) from None
        key = api_key or os.environ.get("GROQ_API_KEY")
        if not key:
            raise UserError("--groq needs an API key: set GROQ_API_KEY in the environment")
        self.config = config
        self._groq = groq
        self._client = groq.Groq(
            api_key=key,
            base_url=config.base_url or os.environ.get("GROQ_BASE_URL") or None,
            max_retries=0,
            timeout=max(config.stt_timeout_s, config.chat_timeout_s, config.tts_timeout_s),
        )
        install_redaction(key)
        self.calls: dict[str, int] = {}  # "endpoint outcome" -> count (metrics)
        self._logged_unexpected = False

    def _count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    def _call(self, name: str, timeout_s: float, deadline: float, timings: Timings, fn):
        """Run ``fn(client)`` with retries inside ``deadline`` (a monotonic time)."""
        g = self._groq
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0.05:
                self._count(f"{name} out_of_time")
                raise GroqUnavailable(f"{name}: no time left in the utterance budget")
            limit_s = min(timeout_s, left)
            client = self._client.with_options(timeout=limit_s)
            try:
                out = _within(lambda c=client: fn(c), limit_s)
                self._count(f"{name} ok")
                return out
            except _OverTime:
                wait, reason = 0.0, f"{name}: timed out (the reply came too slowly)"
                self._count(f"{name} timeout")
            except g.RateLimitError as exc:
                wait = _retry_after(exc.response.headers) or 0.5 * 2**attempt
                reason = f"{name}: rate limited (429, retry-after {wait:g} s)"
                self._count(f"{name} 429")
            except g.InternalServerError as exc:
                wait, reason = 0.1 * 2**attempt, f"{name}: server error {exc.status_code}"
                self._count(f"{name} 5xx")
            except g.APITimeoutError:
                wait, reason = 0.0, f"{name}: timed out"
                self._count(f"{name} timeout")
            except g.APIConnectionError:
                wait, reason = 0.1 * 2**attempt, f"{name}: cannot connect"
                self._count(f"{name} connection")
            except g.APIStatusError as exc:  # 4xx: a request or account problem; no retry
                self._count(f"{name} {exc.status_code}")
                kind = _error_type(exc)
                raise GroqUnavailable(f"{name}: refused ({exc.status_code} {kind})") from None
            except Exception as exc:  # a body that is not what the API returns
                self._count(f"{name} malformed")
                if not self._logged_unexpected:  # once: a client upgrade's TypeError shows here
                    self._logged_unexpected = True
                    log.debug("%s: unexpected %s", name, type(exc).__name__, exc_info=True)
                raise GroqUnavailable(f"{name}: unreadable reply ({type(exc).__name__})") from None
            attempt += 1
            left = deadline - time.monotonic()
            if attempt > self.config.max_retries or wait >= left - 0.05:
                raise GroqUnavailable(reason) from None
            timings.retries += 1
            log.info("%s; retrying in %.2f s", reason, wait)
            time.sleep(wait)

    def transcribe(self, audio_16k: np.ndarray, deadline: float, timings: Timings) -> str:
        """Text of an utterance (or its English translation with ``task = "translate"``)."""
        cfg = self.config
        t = time.monotonic()
        wav = wav_bytes(audio_16k, SAMPLE_RATE)

        def call(c):
            kwargs = {"file": ("utterance.wav", wav), "model": cfg.stt_model}
            if cfg.task == "translate":
                return c.audio.translations.create(**kwargs, response_format="json")
            if cfg.language:
                kwargs["language"] = cfg.language
            return c.audio.transcriptions.create(**kwargs, response_format="json")

        res = self._call("stt", cfg.stt_timeout_s, deadline, timings, call)
        timings.stt_s = time.monotonic() - t
        text = getattr(res, "text", None)
        if not isinstance(text, str):
            self._count("stt malformed")
            raise GroqUnavailable("stt: reply without text")
        return text.strip()

    def rewrite(self, text: str, deadline: float, timings: Timings) -> str:
        """The chat model's rewrite of ``text`` (unchanged when no chat model is set)."""
        cfg = self.config
        if not cfg.chat_model or not text:
            return text
        t = time.monotonic()

        def call(c):
            return c.chat.completions.create(
                model=cfg.chat_model,
                messages=[
                    {"role": "system", "content": cfg.chat_prompt},
                    {"role": "user", "content": text},
                ],
                temperature=0.2,
                max_tokens=256,
            )

        res = self._call("chat", cfg.chat_timeout_s, deadline, timings, call)
        timings.chat_s = time.monotonic() - t
        try:
            out = res.choices[0].message.content
        except (AttributeError, IndexError):
            out = None
        if not isinstance(out, str) or not out.strip():
            self._count("chat malformed")
            raise GroqUnavailable("chat: reply without text")
        return out.strip()

    def speak(self, text: str, deadline: float, timings: Timings) -> np.ndarray:
        """Synthesised speech for ``text`` as 16 kHz mono float32."""
        cfg = self.config
        t = time.monotonic()

        def call(c):
            res = c.audio.speech.create(
                model=cfg.tts_model,
                voice=cfg.tts_voice,
                input=text,
                response_format="wav",
                sample_rate=cfg.tts_sample_rate,
            )
            return res.read()

        data = self._call("tts", cfg.tts_timeout_s, deadline, timings, call)
        try:
            audio = _read_wav(data)
        except Exception:
            self._count("tts malformed")
            raise GroqUnavailable("tts: the reply is not audio") from None
        timings.tts_s = time.monotonic() - t
        return audio


def _retry_after(headers) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                return None
    return None


def _error_type(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("type"), str):
            return err["type"][:40]
    return type(exc).__name__
