"""Settings of the Groq speech features, read from the ``[groq]`` table of ``--config FILE.toml``.

Nothing about Groq's models is hard-coded where it changes: the text-to-speech model and voice
must come from the config (Groq has replaced its TTS models before); the transcription model
has a default (``whisper-large-v3-turbo``) that the config may override.

The time budget is explicit: each utterance has ``utterance_deadline_s`` for all its calls
(transcription, optional rewrite, speech) including retries; a call's timeout is the smaller of
its own and what is left of that deadline. A 429's ``retry-after`` is honoured only if it fits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from musetalk_rt.config_file import read_table
from musetalk_rt.errors import UserError

MODES = ("off", "captions", "voice")


@dataclass
class GroqConfig:
    """Groq speech settings (see ``configs/groq.example.toml`` for each key)."""

    base_url: str | None = None  # None: $GROQ_BASE_URL, else the client's default (Groq)
    stt_model: str = "whisper-large-v3-turbo"
    language: str | None = None  # a hint for transcription ("en", "zh", …)
    task: str = "transcribe"  # or "translate" (Groq's translation endpoint: to English)
    chat_model: str | None = None  # rewrite/translate with a chat model; None: no rewrite
    chat_prompt: str = (
        "Rewrite the speaker's words as one clear sentence to be spoken aloud. "
        "Keep the meaning and the language. Answer with the sentence only."
    )
    tts_model: str | None = None  # required for voice mode
    tts_voice: str | None = None  # required for voice mode
    tts_sample_rate: int = 24000
    stt_timeout_s: float = 2.0
    chat_timeout_s: float = 1.5
    tts_timeout_s: float = 2.5
    utterance_deadline_s: float = 3.5  # all calls of one utterance, retries included
    max_retries: int = 1  # per call, on 429/5xx/timeouts/connection errors
    breaker_failures: int = 3  # consecutive failed utterances that open the circuit
    breaker_cooldown_s: float = 10.0  # then one trial utterance is allowed
    max_utterance_s: float = 8.0  # longer speech is split at a pause
    # voice mode: speech queued further ahead skips the next utterance; captions: an utterance
    # that waited longer for Groq (slow, not failing) gets no caption
    max_behind_s: float = 10.0
    min_pause_ms: int = 400  # a pause this long ends an utterance
    caption_font: str | None = None  # a TTF/TTC/OTF with CJK glyphs (default: searched)

    def validate(self, mode: str) -> None:
        """Raise :class:`UserError` naming the key to fix."""
        if mode not in MODES:
            raise UserError(f"--groq {mode!r}: choose one of {', '.join(MODES)}")
        if self.task not in ("transcribe", "translate"):
            raise UserError(f"[groq] task = {self.task!r}: use 'transcribe' or 'translate'")
        for name in ("stt_timeout_s", "chat_timeout_s", "tts_timeout_s", "utterance_deadline_s"):
            if not 0 < getattr(self, name) <= 30:
                raise UserError(f"[groq] {name} = {getattr(self, name)}: use 0 < seconds <= 30")
        if not 0 <= self.max_retries <= 5:
            raise UserError(f"[groq] max_retries = {self.max_retries}: use 0..5")
        if not 1.0 <= self.max_utterance_s <= 30.0:
            raise UserError(f"[groq] max_utterance_s = {self.max_utterance_s}: use 1..30")
        if not 2.0 <= self.max_behind_s <= 300.0:
            raise UserError(f"[groq] max_behind_s = {self.max_behind_s}: use 2..300")
        if self.tts_sample_rate not in TTS_SAMPLE_RATES:
            raise UserError(
                f"[groq] tts_sample_rate = {self.tts_sample_rate}: use one of "
                f"{', '.join(map(str, TTS_SAMPLE_RATES))} (the rates Groq's speech takes)"
            )
        if mode == "voice" and not (self.tts_model and self.tts_voice):
            raise UserError(
                "--groq voice needs tts_model and tts_voice in the [groq] table of --config "
                "(Groq's text-to-speech models change; see configs/groq.example.toml)"
            )

    def warnings(self, mode: str) -> list[str]:
        """Settings that are allowed but likely wrong (printed at start; the show goes on)."""
        out = []
        if mode != "off" and self.task == "translate" and "turbo" in self.stt_model:
            out.append(
                f"[groq] task = 'translate' with stt_model = {self.stt_model!r}: Groq lists its "
                "turbo whisper for transcription only; if every utterance fails, set "
                "stt_model = 'whisper-large-v3'"
            )
        return out


TTS_SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)  # the client's choices


def load_config(path: str | Path | None) -> GroqConfig:
    """Read ``[groq]`` from a TOML file (None: the defaults)."""
    if path is None:
        return GroqConfig()
    p = Path(path)
    table = read_table(p, "groq")
    known = {f.name: f for f in fields(GroqConfig)}
    if "api_key" in table:  # never in files that get copied around and committed
        raise UserError(f"--config {p}: put the key in GROQ_API_KEY, not in the file")
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise UserError(f"--config {p}: unknown [groq] keys: {', '.join(unknown)}")
    cfg = GroqConfig()
    for key, value in table.items():
        default = getattr(cfg, key)
        expected = type(default) if default is not None else str
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise UserError(
                f"--config {p}: [groq] {key} must be {expected.__name__}, not {value!r}"
            )
        setattr(cfg, key, value or None if default is None else value)
    return cfg
