"""Groq speech: the real ``groq`` client against our stand-in server on 127.0.0.1.

Covers the stand-in's four endpoints, the budgeted client (retries, 429 ``retry-after``, 5xx,
hangs, malformed bodies, a dead server, a wrong key), the circuit breaker, utterance cutting,
caption files and CJK burn-in, the captions and voice-mode sinks (order, the synthesized audio
is what goes out, fallbacks engage and recover), and that the key never reaches a log.
"""

from __future__ import annotations

import io
import logging
import socket
import time

import numpy as np
import pytest

groq = pytest.importorskip("groq", reason="the groq client is in the dev extra")

from musetalk_rt.audio.vad import load_silero_vad  # noqa: E402
from musetalk_rt.errors import UserError  # noqa: E402
from musetalk_rt.media import load_audio  # noqa: E402
from musetalk_rt.speech.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker  # noqa: E402
from musetalk_rt.speech.captions import (  # noqa: E402
    CaptionOverlay,
    CaptionWriter,
    Cue,
    find_cjk_font,
    font_covers,
    parse_srt,
)
from musetalk_rt.speech.config import GroqConfig, load_config  # noqa: E402
from musetalk_rt.speech.groq_client import (  # noqa: E402
    GroqSpeech,
    GroqUnavailable,
    Timings,
    _read_wav,
)
from musetalk_rt.speech.live import CaptionsSink, VoiceSink  # noqa: E402
from musetalk_rt.speech.utterances import SR, UtteranceSegmenter  # noqa: E402
from musetalk_rt.testing.groq_standin import (  # noqa: E402
    Fault,
    GroqStandin,
    Latency,
    StandinConfig,
    speak,
    wav_bytes,
)
from musetalk_rt.testing.speech import TimelineChannel  # noqa: E402

KEY = "gsk_test_" + "9f3c1e7a5b2d4f608a1c3e5b7d9f0a2c"


@pytest.fixture(scope="module")
def vad_net():
    return load_silero_vad()


@pytest.fixture
def standin():
    with GroqStandin(config=StandinConfig(api_key=KEY)) as s:
        yield s


def _wait(cond, timeout_s: float = 60.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def _phrases(*texts: str, pause_s: float = 0.9) -> np.ndarray:
    """espeak-ng phrases at 16 kHz with silences between them (and around)."""
    gap = np.zeros(int(pause_s * SR), np.float32)
    parts = [gap]
    for t in texts:
        parts += [speak(t, SR), gap]
    return np.concatenate(parts)


def _feed(sink, audio: np.ndarray, chunk: int = 320) -> None:
    for i in range(0, audio.size, chunk):
        sink.push(audio[i : i + chunk])


def _speech(standin, **cfg) -> GroqSpeech:
    return GroqSpeech(GroqConfig(base_url=standin.base_url, **cfg), api_key=KEY)


def _occurs_in(needle: np.ndarray, haystack: np.ndarray) -> bool:
    """Whether ``needle`` is an exact slice of ``haystack``."""
    head = needle[:64]
    for i in np.nonzero(haystack == head[0])[0]:
        if np.array_equal(haystack[i : i + needle.size], needle):
            return True
    return False


# -- the stand-in with the real client -------------------------------------------------------------


def test_standin_endpoints_with_the_real_client(standin, fixture_file):
    audio = load_audio(fixture_file("eng.wav")).to_mono_16k()[: 5 * SR]
    c = groq.Groq(api_key=KEY, base_url=standin.base_url, max_retries=0)
    js = c.audio.transcriptions.create(file=("u.wav", wav_bytes(audio, SR)), model="m")
    assert isinstance(js.text, str) and js.text
    vj = c.audio.transcriptions.create(
        file=("u.wav", wav_bytes(audio, SR)), model="m", response_format="verbose_json"
    )
    assert vj.text == js.text and vj.duration == pytest.approx(5.0, abs=0.01)
    assert vj.segments[0]["end"] == pytest.approx(5.0, abs=0.01)
    txt = c.audio.transcriptions.create(
        file=("u.wav", wav_bytes(audio, SR)), model="m", response_format="text"
    )
    assert txt.strip() == js.text
    tr = c.audio.translations.create(file=("u.wav", wav_bytes(audio, SR)), model="m")
    assert tr.text == js.text
    if standin.transcriber.kind == "whisper tiny.en":  # a real transcript of the real speech
        assert "left" in js.text.lower()

    wav = c.audio.speech.create(
        model="tts",
        voice="v",
        input="Good evening, everyone.",
        response_format="wav",
        sample_rate=24000,
    ).read()
    speech = _read_wav(wav)
    assert speech.size > 0.5 * SR and np.abs(speech).max() > 0.1

    chat = c.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "um, so, you know, welcome"}]
    )
    assert chat.choices[0].message.content == "So, welcome"
    stream = c.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "uh hello world"}], stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == "Hello world"

    with pytest.raises(groq.AuthenticationError):
        groq.Groq(
            api_key="wrong", base_url=standin.base_url, max_retries=0
        ).chat.completions.create(model="llm", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(groq.BadRequestError):
        c.audio.speech.create(model="tts", voice="v", input=" ", response_format="wav")
    with pytest.raises(groq.BadRequestError):
        c.audio.transcriptions.create(file=("u.wav", b"not audio at all"), model="m")


# -- the budgeted client ---------------------------------------------------------------------------


def test_client_retries_within_the_budget_and_fails_fast_otherwise(standin):
    standin.config.transcripts = ["Testing one two three."]  # no recogniser time on this host
    sp = _speech(standin, max_retries=1, stt_timeout_s=1.0)
    audio = speak("Testing one two three.", SR)

    def run(deadline_s=3.0):
        t = Timings()
        return sp.transcribe(audio, time.monotonic() + deadline_s, t), t

    standin.inject(Fault(status=429, retry_after_s=0.2, endpoint="transcriptions"))
    text, t = run()
    assert text and t.retries == 1
    standin.inject(Fault(status=503, endpoint="transcriptions"))
    text, t = run()
    assert text and t.retries == 1

    n = len(standin.served)  # a retry-after beyond the budget: give up at once, no second call
    standin.inject(Fault(status=429, retry_after_s=30, endpoint="transcriptions"))
    with pytest.raises(GroqUnavailable, match="retry-after 30"):
        run()
    assert len(standin.served) == n + 1

    standin.inject(*[Fault(status=500, endpoint="transcriptions")] * 2)  # retries run out
    with pytest.raises(GroqUnavailable, match="server error 500"):
        run()
    standin.inject(*[Fault(hang_s=2.5, endpoint="transcriptions")] * 2)  # longer than the timeout
    with pytest.raises(GroqUnavailable, match="timed out"):
        run()
    standin.inject(Fault(malformed=True, endpoint="transcriptions"))
    with pytest.raises(GroqUnavailable, match="unreadable reply"):
        run()
    standin.inject(Fault(reset=True, endpoint="transcriptions"))  # then a retry succeeds
    text, t = run()
    assert text and t.retries == 1
    bad = GroqSpeech(GroqConfig(base_url=standin.base_url), api_key="gsk_wrong")
    with pytest.raises(GroqUnavailable, match="refused \\(401 invalid_api_key\\)"):
        bad.transcribe(audio, time.monotonic() + 2, Timings())
    assert sp.calls["stt ok"] >= 3 and sp.calls["stt 429"] == 2


def test_a_reply_that_trickles_in_is_timed_out_on_the_wall_clock(standin):
    """Each read gets bytes well within the client's timeout, the whole reply takes longer than
    the call's time: the call still ends at its time (not when the last byte comes)."""
    sp = _speech(standin, max_retries=0, tts_timeout_s=1.0, tts_model="tts", tts_voice="v")
    standin.inject(Fault(trickle_s=3.0, endpoint="speech"))
    # without the wall clock the per-read timeout (1 s) never fires and the 3 s reply is used
    with pytest.raises(GroqUnavailable, match="timed out"):
        sp.speak("hello there", time.monotonic() + 3.0, Timings())
    assert sp.calls["tts timeout"] == 1 and "tts ok" not in sp.calls


def test_a_dead_server_is_a_connection_failure_not_a_hang():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    sp = GroqSpeech(GroqConfig(base_url=f"http://127.0.0.1:{port}", max_retries=1), api_key=KEY)
    with pytest.raises(GroqUnavailable, match="cannot connect"):
        sp.speak("hello", time.monotonic() + 2.0, Timings())


def test_missing_key_and_bad_config_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    with pytest.raises(UserError, match="GROQ_API_KEY"):
        GroqSpeech(GroqConfig())
    with pytest.raises(UserError, match="tts_model and tts_voice"):
        GroqConfig().validate("voice")
    bad = {
        "missing.toml": None,
        "broken.toml": "[groq\nstt_model = 1",
        "unknown.toml": "[groq]\nsttmodel = 'x'",
        "type.toml": "[groq]\nstt_timeout_s = 'fast'",
        "key.toml": "[groq]\napi_key = 'gsk_x'",
    }
    for name, text in bad.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        with pytest.raises(UserError) as e:
            load_config(p)
        assert str(p) in str(e.value)
    good = tmp_path / "good.toml"
    good.write_text("[groq]\ntts_model = 'tts-x'\ntts_voice = 'v'\nstt_timeout_s = 1\n")
    cfg = load_config(good)
    cfg.validate("voice")
    assert cfg.stt_timeout_s == 1.0 and cfg.chat_model is None
    with pytest.raises(UserError, match="0 < seconds"):
        GroqConfig(utterance_deadline_s=0).validate("captions")
    with pytest.raises(UserError, match="tts_sample_rate = 12345.*24000"):
        GroqConfig(tts_sample_rate=12345).validate("captions")  # else a 400 on every utterance
    both = tmp_path / "both.toml"  # a key under its own name among unknown keys: the key's line
    both.write_text("[groq]\napi_key = 'gsk_x'\nsttmodel = 'x'\n")
    with pytest.raises(UserError, match="GROQ_API_KEY") as e:
        load_config(both)
    assert "gsk_x" not in str(e.value)
    bom = tmp_path / "bom.toml"  # saved by a Windows editor
    bom.write_bytes("[groq]\nlanguage = 'zh'\n".encode("utf-8-sig"))
    assert load_config(bom).language == "zh"
    assert "whisper-large-v3'" in GroqConfig(task="translate").warnings("captions")[0]
    assert not GroqConfig(task="translate", stt_model="whisper-large-v3").warnings("captions")


def test_circuit_breaker_opens_cools_down_and_recovers():
    now = [0.0]
    changes = []
    b = CircuitBreaker(2, 5.0, clock=lambda: now[0], on_change=lambda a, z: changes.append(z))
    assert b.allow()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow()
    now[0] = 5.0
    assert b.state == HALF_OPEN
    assert b.allow() and not b.allow()  # one trial at a time
    b.failure()
    assert b.state == OPEN and not b.allow()
    now[0] = 10.0
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED] and b.opens == 2


# -- utterances and captions ----------------------------------------------------------------------


def test_utterances_of_real_speech_are_ordered_bounded_and_cover_it(vad_net, fixture_file):
    audio = load_audio(fixture_file("eng.wav")).to_mono_16k()
    seg = UtteranceSegmenter(vad_net, min_pause_ms=400, max_utterance_s=6.0)
    us = []
    for i in range(0, audio.size, 320):
        us += seg.push(audio[i : i + 320])
    us += seg.flush()
    assert len(us) >= 8
    for a, b in zip(us, us[1:], strict=False):
        assert a.end_s <= b.start_s + 1e-6 and a.index + 1 == b.index
    for u in us:
        assert u.duration_s <= 6.0 + 0.2  # the max plus the pads
        assert np.array_equal(
            u.audio, audio[int(u.start_s * SR) : int(u.start_s * SR) + u.audio.size]
        )
    speech_s = sum(u.duration_s for u in us)
    assert speech_s > 0.8 * 60  # the fixture is talk from end to end

    # 3-12 s of the fixture is one VAD segment (no pause of 400 ms): cut at the quietest points
    seg = UtteranceSegmenter(vad_net, max_utterance_s=3.0)
    parts = seg.push(audio[3 * SR : 12 * SR]) + seg.flush()
    assert len(parts) >= 3 and all(p.duration_s <= 3.0 + 0.2 for p in parts)
    assert sum(p.split for p in parts) >= 2


def test_caption_files_round_trip_and_cjk_burn_in(tmp_path):
    cues = [Cue(0, 0.5, 2.25, "Good evening, everyone."), Cue(1, 61.0, 3725.5, "各位來賓，晚安。")]
    for suffix in ("srt", "vtt"):
        w = CaptionWriter(tmp_path / f"c.{suffix}")
        for c in cues:
            w.add(c)
        text = (tmp_path / f"c.{suffix}").read_text(encoding="utf-8")
        w.close()
        back = parse_srt(text)
        assert [(c.start_s, c.end_s, c.text) for c in back] == [
            (c.start_s, c.end_s, c.text) for c in cues
        ]
    assert "00:01:01,000 --> 01:02:05,500" in (tmp_path / "c.srt").read_text(encoding="utf-8")
    assert (tmp_path / "c.vtt").read_text(encoding="utf-8").startswith("WEBVTT")
    with pytest.raises(UserError, match=".srt or .vtt"):
        CaptionWriter(tmp_path / "c.txt")

    try:
        font = find_cjk_font()
    except UserError as exc:
        pytest.fail(f"{exc} (CI installs fonts-wqy-microhei)")
    assert font_covers(font, "各位來賓晚安") and not font_covers(
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "各位"
    )
    ov = CaptionOverlay(font, (640, 360))
    frame = np.full((360, 640, 3), 80, np.uint8)
    drawn = {}
    for i, text in enumerate(("說", "話")):
        ov.add(Cue(i, i * 10.0, i * 10.0 + 5, text))
        out = ov.apply(frame, i * 10.0 + 1)
        diff = np.abs(out.astype(int) - frame).sum(2)
        ys, xs = np.nonzero(diff)
        assert ys.min() > 360 * 0.6  # bottom band only
        drawn[text] = out.min(2) > 200  # the white glyph pixels
        assert drawn[text].sum() > 50
    a, b = drawn["說"], drawn["話"]
    assert (a ^ b).sum() > 0.3 * (a | b).sum()  # two different glyphs, not two missing-glyph boxes
    assert ov.apply(frame, 7.0) is frame  # no caption between cues: untouched


# -- the sinks -------------------------------------------------------------------------------------


def test_captions_sink_transcribes_each_utterance_in_order(
    standin, vad_net, fixture_file, tmp_path
):
    audio = load_audio(fixture_file("eng.wav")).to_mono_16k()[: 24 * SR]
    ch = TimelineChannel()
    # 24 s fed at once queues every utterance together: none may be skipped for waiting
    sp = _speech(standin, max_behind_s=300.0)
    sink = CaptionsSink(ch, sp, sp.config, vad_net, writer=CaptionWriter(tmp_path / "c.srt"))
    sink.start()
    try:
        sink.open_session()
        _feed(sink, audio)
        sink.close_session()
        _wait(
            lambda: sink.stats.utterances >= 3 and sink.stats.captions == sink.stats.utterances,
            120,
            "captions",
        )
        msgs = sink.take_messages()
    finally:
        sink.stop()
    assert np.array_equal(ch.sessions[0].audio, audio)  # the MC's audio went out untouched
    cues = parse_srt((tmp_path / "c.srt").read_text(encoding="utf-8"))
    assert len(cues) == sink.stats.utterances == len(msgs)
    assert all(a.end_s <= b.start_s + 1e-3 for a, b in zip(cues, cues[1:], strict=False))
    assert all(c.text for c in cues) and [m["text"] for m in msgs] == [c.text for c in cues]
    if standin.transcriber.kind == "whisper tiny.en":
        assert "left" in cues[0].text.lower()


def test_a_sender_that_says_bye_gets_the_caption_of_its_last_utterance(standin, vad_net):
    """Speech to the very end, then bye: the last utterance is cut at the bye and its caption
    reaches the sender before the server closes (it had closed first, the caption only in the
    file); afterwards nothing is pending, so a bye after silence has nothing to wait for."""
    import asyncio

    from musetalk_rt.live.ingest import IngestConfig, IngestServer
    from musetalk_rt.live.send import send_clip
    from musetalk_rt.media import AudioClip

    speech = _phrases("good evening everyone", "welcome to the hall")
    speech = speech[: speech.size - int(0.9 * SR)]  # no pause after the last word
    sp = _speech(standin)
    sink = CaptionsSink(TimelineChannel(), sp, sp.config, vad_net)
    sink.start()

    async def go(audio):
        config = IngestConfig(port=0, token="t", bye_linger_s=60.0)  # (a loaded host's Groq)
        async with IngestServer({"a": sink}, config) as srv:
            url = f"ws://127.0.0.1:{srv.port}/ingest/a"
            return await send_clip(url, AudioClip(audio[None], SR), "t", realtime=False)

    try:
        rep = asyncio.run(go(speech))
        assert sink.stats.utterances == 2 and sink.stats.captions == 2
        assert [c["index"] for c in rep.captions] == [0, 1] and all(c["text"] for c in rep.captions)
        assert not sink.messages_pending()
        rep = asyncio.run(go(np.zeros(SR // 2, np.float32)))
        assert rep.captions == [] and not sink.messages_pending()
    finally:
        sink.stop()


def test_voice_mode_speaks_groq_speech_in_order(standin, vad_net):
    ch = TimelineChannel()
    sp = _speech(standin, tts_model="tts", tts_voice="v", chat_model="llm")
    sink = VoiceSink(ch, sp, sp.config, vad_net)
    captions = []
    sink._publish = lambda cue, kind, extra=None: captions.append((cue, kind))
    mc = _phrases("Good evening everyone.", "Welcome to the show tonight.", "Let us begin.")
    sink.start()
    try:
        sink.open_session()
        _feed(sink, mc)
        sink.close_session()
        _wait(lambda: sink.stats.spoken == 3, 120, "three spoken utterances")
    finally:
        sink.stop()
    assert sink.stats.fallbacks == 0 and sink.stats.passthrough_s == 0
    assert len(ch.sessions) == 3 and len(captions) == 3
    for s, (cue, kind) in zip(ch.sessions, captions, strict=True):
        expected = _read_wav(wav_bytes(speak(cue.text, 24000), 24000))
        assert kind == "spoken" and np.array_equal(s.audio, expected)  # Groq's speech goes out
        assert not _occurs_in(s.audio[SR // 4 : SR // 2], mc)  # and not the MC's voice
    for a, b in zip(ch.sessions, ch.sessions[1:], strict=False):
        assert b.base_frame >= a.end_frame  # one after the other, none cut
    assert sink.stats.as_dict()["utterance_to_speech_ms"]["n"] == 3
    assert standin.counts("chat") == {200: 3} and standin.counts("speech") == {200: 3}


def test_voice_mode_skips_utterances_while_its_speech_runs_too_far_behind(standin, vad_net, caplog):
    """Speech much longer than the MC's words piles up: while what is queued reaches past
    ``max_behind_s``, the next utterances are skipped (no Groq call, counted, logged) instead
    of playing later and later; once caught up, voice mode speaks again."""
    standin.config.transcripts = [
        "This is a much longer sentence than the one the speaker said, and it goes on for a "
        "good while before it comes to an end."
    ]
    ch = TimelineChannel()
    sp = _speech(standin, tts_model="tts", tts_voice="v", max_behind_s=2.0)
    sink = VoiceSink(ch, sp, sp.config, vad_net)
    sink.start()
    try:
        sink.open_session()
        mc = ("Good evening everyone.", "Welcome to the show.", "Let us begin.", "Thank you.")
        _feed(sink, _phrases(*mc))
        _wait(lambda: sink.stats.utterances >= 4 and sink.utt_q.empty(), 60, "four utterances")
        _wait(lambda: sink.stats.spoken + sink.stats.skipped_behind >= 4, 60, "all handled")
        assert sink.stats.spoken == 1 and sink.stats.skipped_behind == 3
        assert sink.behind_s() > 2.0 and standin.counts("speech") == {200: 1}
        assert "voice mode runs" in caplog.text and "skipped so it catches up" in caplog.text
        sink._queued_until = 0.0  # the queued speech has played out
        _feed(sink, _phrases("Here we are again."))
        _wait(lambda: sink.stats.spoken == 2, 60, "speech again once caught up")
        sink.close_session()
    finally:
        sink.stop()
    assert len(ch.sessions) == 2 and sink.stats_dict()["skipped_behind"] == 3
    with pytest.raises(UserError, match=r"max_behind_s = 1.0: use 2..300"):
        GroqConfig(max_behind_s=1.0).validate("voice")


def test_voice_mode_falls_back_and_recovers_and_never_logs_the_key(standin, vad_net, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # everything, the client's and httpx's debug logs included
    standin.config.leaky_errors = True  # error bodies echo the key: it must still not be logged
    standin.config.transcripts = ["Groq is back again."]  # no recogniser time: short deadlines
    ch = TimelineChannel()
    sp = _speech(
        standin,
        tts_model="tts",
        tts_voice="v",
        breaker_failures=2,
        breaker_cooldown_s=1.0,
        utterance_deadline_s=2.0,
        max_retries=1,
    )
    sink = VoiceSink(ch, sp, sp.config, vad_net)
    a = _phrases("First sentence here.", "Second sentence here.")
    b = _phrases("Spoken live while it is down.")
    c = _phrases("Groq is back again.")
    sink.start()
    try:
        sink.open_session()
        standin.config.down = True  # 503 for everything
        _feed(sink, a)
        _wait(lambda: sink.stats.failures == 2, 60, "two failed utterances")
        assert sink.breaker.state == OPEN
        _feed(sink, np.zeros(SR // 2, np.float32))  # a pause: the live voice takes over
        _wait(lambda: sink._passthrough, 10, "passthrough")
        _feed(sink, b)
        _wait(lambda: sink.stats.passthrough_s >= b.size / SR - 0.1, 30, "live voice")
        standin.config.down = False
        time.sleep(1.1)  # the cool-down
        _feed(sink, np.zeros(SR // 2, np.float32))  # at a pause, voice mode tries again
        _wait(lambda: not sink._passthrough, 10, "voice mode again")
        _feed(sink, c)
        _wait(lambda: sink.stats.spoken == 1, 60, "a spoken utterance after recovery")
        sink.close_session()
        metrics_like = repr(sink.stats_dict())
    finally:
        sink.stop()
    assert sink.breaker.state == CLOSED and sink.stats.fallbacks == 2
    fallback = [s.audio for s in ch.sessions[:2]]
    for f in fallback:  # the MC's own recording of each failed utterance, in order
        assert f.size > SR // 2 and _occurs_in(f, a)
    assert _occurs_in(ch.sessions[2].audio[: SR // 2], b)  # then the live voice
    assert len(ch.sessions) == 4 and not _occurs_in(ch.sessions[3].audio[:SR], c)
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, metrics_like):
        assert KEY not in text
    assert "Groq is failing" in caplog.text and "Groq is back" in caplog.text


def test_captions_pause_while_groq_fails_and_resume(standin, vad_net):
    standin.config.transcripts = ["Testing captions."]  # no recogniser time: short deadlines
    ch = TimelineChannel()
    sp = _speech(standin, breaker_failures=1, breaker_cooldown_s=0.5, utterance_deadline_s=2.0)
    sink = CaptionsSink(ch, sp, sp.config, vad_net)
    one = _phrases("Testing captions.")
    sink.start()
    try:
        sink.open_session()
        standin.inject(*[Fault(status=500, endpoint="transcriptions")] * 2)
        _feed(sink, one)
        _wait(lambda: sink.stats.failures == 1, 30, "a failure")
        _feed(sink, one)  # while open: paused, Groq is not called
        _wait(lambda: sink.stats.utterances == 2 and sink.utt_q.empty(), 30, "second utterance")
        calls = len(standin.served)
        time.sleep(0.6)
        _feed(sink, one)
        _wait(lambda: sink.stats.captions == 1, 30, "captions resumed")
        sink.close_session()
    finally:
        sink.stop()
    assert calls == 2 and sink.breaker.state == CLOSED
    total = sum(s.audio.size for s in ch.sessions)
    assert total == 3 * one.size  # the audio path never waited on Groq


def test_captions_skip_what_waited_too_long_for_a_slow_groq(standin, vad_net, caplog):
    """Groq slow but not failing (no breaker): the utterances that waited more than
    max_behind_s get no caption, so captions do not fall further and further behind."""
    caplog.set_level(logging.INFO, logger="musetalk_rt.speech")
    said = ["The first caption.", "The second caption.", "The third one.", "And the fourth."]
    standin.config.transcripts = list(said)
    standin.set_latency({"transcriptions": Latency(base_ms=1500)})
    ch = TimelineChannel()
    sp = _speech(standin, max_behind_s=2.0, stt_timeout_s=3.0)
    sink = CaptionsSink(ch, sp, sp.config, vad_net)
    sink.start()
    try:
        sink.open_session()
        _feed(sink, _phrases(*said))  # all queued at once
        sink.close_session()
        _wait(lambda: sink.stats.utterances >= 4, 30, "four utterances")
        _wait(lambda: sink.utt_q.unfinished_tasks == 0, 60, "all handled")
    finally:
        sink.stop()
    st = sink.stats
    assert st.utterances == 4 and st.captions >= 1 and st.skipped_stale >= 1, st
    assert st.captions + st.skipped_stale == st.utterances and st.failures == 0
    assert sink.stats_dict()["skipped_stale"] == st.skipped_stale
    assert "waited" in caplog.text and "max_behind_s" in caplog.text


def test_the_breaker_line_names_the_fix_for_a_wrong_key(standin, vad_net, caplog):
    ch = TimelineChannel()
    sp = GroqSpeech(GroqConfig(base_url=standin.base_url, breaker_failures=1), api_key="gsk_no")
    sink = CaptionsSink(ch, sp, sp.config, vad_net)
    sink.start()
    try:
        sink.open_session()
        _feed(sink, _phrases("Hello."))
        _wait(lambda: sink.stats.failures == 1, 30, "a failure")
    finally:
        sink.stop()
    opened = [r.getMessage() for r in caplog.records if "circuit closed -> open" in r.getMessage()]
    assert opened and "401" in opened[0] and "check GROQ_API_KEY" in opened[0]


def test_session_control_is_never_dropped_on_a_full_audio_queue(vad_net):
    """The audio queue's bound drops chunks, never a session's open or close."""
    from musetalk_rt.speech.live import AUDIO_QUEUE_S

    sink = CaptionsSink(TimelineChannel(), None, GroqConfig(), vad_net)  # threads not started
    sink.open_session()
    for _ in range(int(AUDIO_QUEUE_S * SR) // 320 + 10):  # 20 ms chunks: 10 too many
        sink.push(np.zeros(320, np.float32))
    sink.close_session()
    kinds = [sink.audio_q.get_nowait()[0] for _ in range(sink.audio_q.qsize())]
    assert kinds[0] == "open" and kinds[-1] == "close"
    assert sink.stats.dropped_audio_chunks == 10  # the open takes no audio's place


def test_voice_mode_counts_a_spoken_caption_pending_until_its_speech_starts(vad_net):
    """In voice mode the caption is published when the channel starts playing the speech,
    after the request thread is done with the utterance: until then it is pending, so the
    ingest's wait after a bye does not end without it."""
    from musetalk_rt.speech.utterances import Utterance

    class LaterStart(TimelineChannel):  # starts a session when told, as a busy channel does
        def open_session(self, on_start=None):
            self.start_later = on_start
            super().open_session(None)

    ch = LaterStart()
    sink = VoiceSink(ch, None, GroqConfig(), vad_net)  # threads not started
    speech = np.full(SR // 2, 0.1, np.float32)
    sink._play(speech, "good evening", Utterance(0, 0.0, 0.5, speech), time.monotonic(), {})
    assert sink.messages_pending() and sink.take_messages() == []
    ch.start_later(0)
    assert not sink.messages_pending()
    assert [m["text"] for m in sink.take_messages()] == ["good evening"]
    sink._play(speech, None, Utterance(1, 1.0, 1.5, speech), time.monotonic(), {})
    assert not sink.messages_pending()  # the MC's own recording: no caption to wait for


def test_stat_of_io_wav_reader_accepts_other_rates():
    x = speak("Rates.", 48000)
    y = _read_wav(wav_bytes(x, 48000))
    assert abs(y.size - x.size / 3) <= 2 and io  # resampled to 16 kHz


def test_live_groq_options_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    from musetalk_rt.live.app import main

    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    no_tts = tmp_path / "no_tts.toml"
    no_tts.write_text("[groq]\nstt_model = 'whisper-large-v3-turbo'\n")
    dejavu = tmp_path / "latin.toml"
    dejavu.write_text("[groq]\ncaption_font = '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf'\n")
    base = ["--avatar", "nobody", "--record", str(tmp_path / "x.mp4"), "--weights", "tiny"]
    cases = [
        (["--groq", "voice", "--config", str(no_tts)], "tts_model and tts_voice"),
        (["--captions", str(tmp_path / "c.srt")], "add --groq captions"),
        (["--groq", "captions", "--config", str(tmp_path / "none.toml")], "no such file"),
        (["--groq", "captions"], "GROQ_API_KEY"),
        (["--groq", "captions", "--captions", str(tmp_path / "c.txt")], ".srt or .vtt"),
    ]
    for extra, expected in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("GROQ_API_KEY", KEY)
    assert main(base + ["--groq", "captions", "--burn-captions", "--config", str(dejavu)]) == 2
    err = capsys.readouterr().err
    assert "no Chinese glyphs" in err and KEY not in err
    with pytest.raises(SystemExit) as e:
        main(base + ["--groq", "loud"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
