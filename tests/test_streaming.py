"""The streaming audio path: resampler, incremental features, voice activity, audio check."""

from __future__ import annotations

import json
import shutil
import subprocess
import wave

import numpy as np
import pytest
import torch

from musetalk_rt.audio.features import AudioFeatureExtractor, whisper_hidden_states
from musetalk_rt.audio.incremental import (
    FRAME_SAMPLES,
    BatchedEncoder,
    IncrementalFeatureExtractor,
    StreamingConfig,
)
from musetalk_rt.audio.parity import frame_errors, stream_windows
from musetalk_rt.audio.stream import AudioInput
from musetalk_rt.audio.vad import (
    SileroVadNet,
    SpeechGate,
    VadBatcher,
    VadConfig,
    VoiceActivity,
    load_silero_vad,
    silero_weights_path,
)
from musetalk_rt.cli import main
from musetalk_rt.media import load_audio, probe_media


@pytest.fixture(scope="session")
def tiny_en():
    """The trained whisper tiny.en encoder (test stand-in) and a feature extractor."""
    from transformers import WhisperFeatureExtractor

    from musetalk_rt.testing.ct2_whisper import load_tiny_en_encoder

    return load_tiny_en_encoder(), WhisperFeatureExtractor()


def _eng16k(fixture_file) -> np.ndarray:
    return load_audio(fixture_file("eng.wav")).to_mono_16k()


# --- streaming resampler ---------------------------------------------------------------------


def test_streamed_resampling_equals_one_shot_for_any_chunking(fixture_file):
    clip = load_audio(fixture_file("yongen.wav"))  # 48 kHz stereo
    assert (clip.sample_rate, clip.channels) == (48000, 2)
    offline = clip.to_mono_16k()
    x = clip.samples.T  # [N, 2]
    for chunk in (7, 480, 96000):  # 0.15 ms, 10 ms, 2 s
        ai = AudioInput(48000, 2)
        parts = [ai.push(x[i : i + chunk]) for i in range(0, len(x), chunk)] + [ai.flush()]
        out = np.concatenate(parts)
        assert out.shape == offline.shape
        np.testing.assert_array_equal(out, offline)  # no clicks at chunk borders: identical


def test_pcm_bytes_formats_decode_alike():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1600) * 3000).astype(np.int16)
    a = AudioInput(16000, 1).push(x.tobytes(), fmt="pcm_s16le")
    b = AudioInput(16000, 1).push((x.astype(np.float32) / 32768).tobytes(), fmt="f32le")
    np.testing.assert_allclose(a, b, atol=1e-7)
    with pytest.raises(ValueError, match="whole number"):
        AudioInput(16000, 2).push(b"\x00\x01\x02")  # 3 bytes: not whole stereo s16 frames
    with pytest.raises(ValueError, match="unknown PCM format"):
        AudioInput().push(b"\x00\x00", fmt="mp3")


def test_bad_samples_are_repaired_and_counted():
    ai = AudioInput(16000, 1)
    x = np.zeros(1000, np.float32)
    x[10], x[20], x[30], x[40] = np.nan, np.inf, -np.inf, 3.0
    out = ai.push(x)
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
    assert ai.stats.non_finite == 3 and ai.stats.clipped == 1
    assert ai.push(np.zeros(0, np.float32)).size == 0 and ai.stats.empty_chunks == 1
    assert ai.push(b"").size == 0
    # an empty decode that names another rate (opus: the hello's, not the decoder's 48 kHz)
    # restarts nothing: a restart drains the resampler mid-stream, a click in the sound
    assert ai.push(np.zeros(0, np.float32), sample_rate=48000).size == 0
    assert ai.stats.format_changes == 0 and ai.sample_rate == 16000


def test_sample_rate_change_mid_stream_keeps_time():
    ai = AudioInput(48000, 2)
    t = np.arange(48000) / 48000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t)] * 2, axis=1).astype(np.float32) * 0.5
    n = ai.push(stereo).size  # 1 s at 48 kHz stereo
    n += ai.push(np.zeros(8000, np.float32), sample_rate=8000, channels=1).size  # 1 s at 8 kHz
    n += ai.flush().size
    assert ai.stats.format_changes == 1
    assert abs(n - 32000) <= 16  # two seconds at 16 kHz, within 1 ms
    with pytest.raises(ValueError, match="outside 8000"):
        ai.push(np.zeros(10, np.float32), sample_rate=4000)
    assert ai.push(np.zeros(1600, np.float32)).size > 0  # the stream goes on after a refusal


# --- incremental features --------------------------------------------------------------------


def test_whisper_hidden_states_equal_transformers(tiny_models):
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = tiny_models.whisper(mel, output_hidden_states=True).hidden_states
        ours = whisper_hidden_states(tiny_models.whisper, mel)  # [2, 1500, 5, 384]
    assert ours.shape == (2, 1500, 5, 384)
    torch.testing.assert_close(ours, torch.stack(ref, dim=2))


def test_trained_test_encoder_matches_ctranslate2(tiny_en, fixture_file):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is a dev dependency")
    from musetalk_rt.testing.ct2_whisper import tiny_en_model_file

    enc, fe = tiny_en
    audio = _eng16k(fixture_file)[: 16000 * 30]
    mel = fe(audio, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
    with torch.inference_mode():
        ours = enc(torch.from_numpy(mel)).last_hidden_state.numpy()
    model = ctranslate2.models.Whisper(str(tiny_en_model_file().parent), device="cpu")
    ref = np.array(model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True))
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def test_segment_canvas_equals_offline_extractor(tiny_en, fixture_file):
    enc, fe = tiny_en
    audio = _eng16k(fixture_file)  # 60 s: two offline segments
    ref = AudioFeatureExtractor(enc, fe).windows(audio)
    got, ex = stream_windows(enc, fe, audio, StreamingConfig(canvas="segment"), 16000 * 7 + 13)
    assert got.shape == ref.shape == (1500, 50, 384)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert ex.stats.canvases == 2  # each segment encoded once


def test_chunk_size_does_not_change_output_and_no_frame_comes_early(tiny_models, fixture_file):
    whisper, fe = tiny_models.whisper, tiny_models.feature_extractor
    audio = _eng16k(fixture_file)[: 16000 * 3]
    cfg = StreamingConfig(extra_lookahead_ms=40, hop_frames=5)
    outs = {}
    for chunk in (160, 16000 * 2):  # 10 ms and 2 s
        ex = IncrementalFeatureExtractor(whisper, fe, cfg)
        parts, expected = [], 0
        for i in range(0, len(audio), chunk):
            out = ex.push(audio[i : i + chunk])
            if out is None:
                continue
            assert out.start_frame == expected
            for f in range(out.start_frame, out.start_frame + len(out)):
                # frame f's own audio ends at (f + 1) * 640; it needs 80 + 40 ms beyond that
                assert ex.received >= (f + 1) * FRAME_SAMPLES + 2 * FRAME_SAMPLES + 640
            expected += len(out)
            parts.append(out.windows)
        last = ex.flush()
        parts.append(last.windows)
        outs[chunk] = torch.cat(parts)
    assert outs[160].shape == (75, 50, 384)
    torch.testing.assert_close(outs[160], outs[32000], rtol=0, atol=1e-5)


@pytest.mark.parametrize("canvas", ["aligned", "segment"])
def test_skipping_frames_a_live_channel_has_shown_keeps_the_later_ones_exact(
    tiny_models, fixture_file, canvas
):
    """A feature thread that fell behind skips the windows it would compute too late: the
    frames after the skip are the same as without it, and fewer canvases are encoded."""
    whisper, fe = tiny_models.whisper, tiny_models.feature_extractor
    audio = _eng16k(fixture_file)[: 16000 * 4]
    cfg = StreamingConfig(hop_frames=3, canvas=canvas)
    full = IncrementalFeatureExtractor(whisper, fe, cfg)
    ref = torch.cat([c.windows for c in (full.push(audio), full.flush()) if c is not None])
    ex = IncrementalFeatureExtractor(whisper, fe, cfg)
    first = ex.push(audio[:16000])  # 1 s arrives; then the thread falls 2 s behind
    done = len(first) if first is not None else 0  # (segment canvases wait for more audio)
    assert ex.skip_to(52) == 51 - done  # to 51: the start of 52's hop group
    assert ex.skip_to(40) == 0  # never backwards
    later = [c for c in (ex.push(audio[16000:]), ex.flush()) if c is not None]
    assert later[0].start_frame == 51
    got = torch.cat([c.windows for c in later])
    assert ref.shape == (100, 50, 384) and got.shape == (49, 50, 384)
    torch.testing.assert_close(got, ref[51:], rtol=0, atol=1e-5)
    assert ex.stats.skipped_frames == 51 - done
    if canvas == "aligned":  # a canvas per hop group: the skipped groups' are never encoded
        assert ex.stats.canvases < full.stats.canvases


def test_60_s_in_20_ms_chunks_gives_1500_frames_in_order(tiny_models, fixture_file):
    whisper, fe = tiny_models.whisper, tiny_models.feature_extractor
    audio = _eng16k(fixture_file)
    ex = IncrementalFeatureExtractor(whisper, fe, StreamingConfig(hop_frames=25))
    frames, peak = [], 0
    for i in range(0, len(audio), 320):
        out = ex.push(audio[i : i + 320])
        peak = max(peak, ex.pending_samples())
        if out is not None:
            frames.extend(range(out.start_frame, out.start_frame + len(out)))
    out = ex.flush()
    frames.extend(range(out.start_frame, out.start_frame + len(out)))
    assert frames == list(range(1500))
    # at most one 30 s segment, one hop, the look-ahead and one chunk of audio are ever held
    assert peak <= 16000 * 30 + 25 * FRAME_SAMPLES + 3 * FRAME_SAMPLES + 320


def test_bad_stream_input_and_ten_minutes_of_silence(tiny_models):
    whisper, fe = tiny_models.whisper, tiny_models.feature_extractor
    ai = AudioInput(16000, 1)
    ex = IncrementalFeatureExtractor(whisper, fe, StreamingConfig(canvas="segment"))
    vad = VoiceActivity(load_silero_vad())
    vad.keep_probs = False
    bad = np.full(320, np.nan, np.float32)
    frames = 0
    peak = 0
    for chunk in [bad, np.zeros(0, np.float32), np.full(320, 5.0, np.float32)] + [
        np.zeros(16000, np.float32)
    ] * 600:  # then 10 minutes of silence in 1 s chunks
        pcm = ai.push(chunk)
        vad.push(pcm)
        out = ex.push(pcm)
        frames += len(out) if out is not None else 0
        peak = max(peak, ex.pending_samples())
        assert vad._pending.size < 512
    out = ex.flush()
    frames += len(out) if out is not None else 0
    assert frames == (600 * 16000 + 640) * 25 // 16000
    # bounded: the segment canvas holds at most two 30 s segments (+ one chunk) of audio
    assert peak <= 16000 * 61 and len(ex._exact) <= 2
    assert vad.finish() == []  # silence (and repaired garbage) is not speech
    assert ai.stats.non_finite == 320 and ai.stats.clipped == 320
    with pytest.raises(RuntimeError, match="after flush"):
        ex.push(np.zeros(10, np.float32))


def test_streaming_config_rejects_bad_settings():
    for kwargs in (
        {"context_ms": 30},
        {"extra_lookahead_ms": -20},
        {"hop_frames": 0},
        {"canvas": "round"},
    ):
        with pytest.raises(ValueError):
            StreamingConfig(**kwargs)
    cfg = StreamingConfig(extra_lookahead_ms=120, hop_frames=3)
    assert cfg.lookahead_ms == 200 and cfg.added_delay_ms == 200


# --- voice activity --------------------------------------------------------------------------


def test_vad_network_reproduces_the_package_model(fixture_file):
    jit = torch.jit.load(str(silero_weights_path().parent / "silero_vad.jit"))
    sd = {k.removeprefix("_model."): v for k, v in jit.state_dict().items()}
    names = {
        "stft_conv.weight": "stft.forward_basis_buffer",
        **{
            f"conv{i + 1}.{p}": f"encoder.{i}.reparam_conv.{p}"
            for i in range(4)
            for p in ("weight", "bias")
        },
        **{
            f"lstm_cell.{p}": f"decoder.rnn.{p}"
            for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        },
        "final_conv.weight": "decoder.decoder.2.weight",
        "final_conv.bias": "decoder.decoder.2.bias",
    }
    net = SileroVadNet().eval()
    net.load_state_dict({ours: sd[theirs] for ours, theirs in names.items()})
    audio = _eng16k(fixture_file)[: 16000 * 6]
    with torch.no_grad():
        ref = [
            float(jit(torch.from_numpy(audio[i : i + 512]), 16000))
            for i in range(0, len(audio) - 511, 512)
        ]
    va = VoiceActivity(net)
    va.push(audio)
    np.testing.assert_allclose(va.probs, ref, atol=1e-5)


def test_vad_gives_the_same_calls_for_any_push_size(fixture_file):
    """The live feature thread hands the VAD whatever queued up (one 20 ms chunk, or a second
    of them when it fell behind): windows are analysed in one batched front-end call per push,
    and the probabilities and segments do not depend on how the audio was cut."""
    net = load_silero_vad()
    audio = _eng16k(fixture_file)[: 16000 * 12]
    results = []
    for chunk in (320, 16000, len(audio)):  # 20 ms, 1 s, all at once
        va = VoiceActivity(net)
        for i in range(0, len(audio), chunk):
            va.push(audio[i : i + chunk])
        segs = [(s.start_ms, s.end_ms) for s in va.finish()]
        results.append((np.array(va.probs), segs))
    for probs, segs in results[1:]:
        np.testing.assert_allclose(probs, results[0][0], atol=1e-5)
        assert segs == results[0][1] and len(segs) >= 1


def test_vad_batcher_serves_many_streams_with_the_one_stream_results(fixture_file):
    """Live channels share one voice-activity thread (:class:`VadBatcher`): four streams cut in
    different chunk sizes, pushed from four threads at once, get the probabilities and segments
    a stream of its own gets; a stream's bad input fails that call alone, also when batched with
    another; a stalled batcher never holds a caller past ``wait_s``; after close the calls run on
    the caller's thread."""
    import threading

    net = load_silero_vad()
    audio = _eng16k(fixture_file)[: 16000 * 8]
    alone = VoiceActivity(net)
    alone.push(audio)
    want_segs = [(s.start_ms, s.end_ms) for s in alone.finish()]
    batcher = VadBatcher(net, gather_s=0.005, streams=4)
    vas = [VoiceActivity(batcher) for _ in range(4)]
    chunks = (320, 512, 1000, 16000)

    def feed(va, chunk):
        for i in range(0, len(audio), chunk):
            va.push(audio[i : i + chunk])

    threads = [threading.Thread(target=feed, args=a) for a in zip(vas, chunks, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for va in vas:
        np.testing.assert_allclose(va.probs, alone.probs, atol=1e-5)
        assert [(s.start_ms, s.end_ms) for s in va.finish()] == want_segs
    pushes_with_windows = sum(
        sum(1 for i in range(0, len(audio), c) if (i + c) // 512 > i // 512) for c in chunks
    )
    assert batcher.requests == pushes_with_windows and batcher.calls <= batcher.requests
    assert batcher.timeouts == 0

    # all streams present: one batched call for the three (the gather would wait 30 s)
    slow = VadBatcher(net, gather_s=30.0, streams=3)
    x = torch.from_numpy(audio[: 3 * 576].reshape(3, 576).copy())
    out: list = [None] * 3
    ts = [
        threading.Thread(target=lambda i=i: out.__setitem__(i, slow.run(x[: i + 1], None)))
        for i in range(3)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert slow.calls == 1 and slow.requests == 3
    for i in range(3):
        np.testing.assert_allclose(out[i][0], net.run(x[: i + 1], None)[0], atol=1e-5)
    slow.close()

    # a bad request batched with a good one: the batch is retried one by one, so only the bad
    # one's caller gets the error
    pair = VadBatcher(net, gather_s=30.0, streams=2)
    res: dict = {}

    def call(key, xx):
        try:
            res[key] = pair.run(xx, None)
        except RuntimeError as exc:
            res[key] = exc

    ts = [threading.Thread(target=call, args=a) for a in (("bad", torch.zeros(2, 7)), ("ok", x))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert isinstance(res["bad"], RuntimeError)
    np.testing.assert_allclose(res["ok"][0], net.run(x, None)[0], atol=1e-5)
    pair.close()
    # a stalled batcher (here: waiting 30 s for a second stream) never holds a caller longer
    # than wait_s: the caller runs the network itself
    stalled = VadBatcher(net, gather_s=30.0, streams=2, wait_s=0.2)
    np.testing.assert_allclose(stalled.run(x[:1], None)[0], net.run(x[:1], None)[0], atol=1e-5)
    assert stalled.timeouts == 1
    stalled.close(timeout_s=0.1)

    with pytest.raises(RuntimeError):
        batcher.run(torch.zeros(2, 7), None)  # the wrong window size: that caller's error
    probs, state = batcher.run(x[:2], None)  # the thread still serves the others
    np.testing.assert_allclose(probs, net.run(x[:2], None)[0], atol=1e-5)
    batcher.close()
    batcher.close()
    assert not batcher._thread.is_alive()
    assert batcher.run(x[:1], state)[0] == pytest.approx(net.run(x[:1], state)[0], abs=1e-5)


def _speech_bounds(x: np.ndarray, sr: int = 16000) -> tuple[float, float]:
    """First and last 10 ms block above -35 dB of the peak (the truth for one utterance)."""
    blocks = x[: len(x) // 160 * 160].reshape(-1, 160)
    rms = np.sqrt((blocks**2).mean(axis=1))
    on = np.nonzero(rms > rms.max() * 10 ** (-35 / 20))[0]
    return on[0] * 10.0, (on[-1] + 1) * 10.0


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (CI installs it)")
def test_vad_borders_within_100_ms_on_known_silences(tmp_path):
    sentences = [
        "Good evening and welcome to the hall.",
        "Tonight we have three speakers.",
        "Please take your seats.",
    ]
    gaps_s = [0.4, 1.2, 0.7, 0.9]  # before, between, between, after
    parts, truth, t_ms = [np.zeros(int(gaps_s[0] * 16000), np.float32)], [], gaps_s[0] * 1000
    for i, text in enumerate(sentences):
        wav = tmp_path / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
        clip = load_audio(wav).to_mono_16k()
        a, b = _speech_bounds(clip)
        truth.append((t_ms + a, t_ms + b))
        parts += [clip, np.zeros(int(gaps_s[i + 1] * 16000), np.float32)]
        t_ms += len(clip) / 16 + gaps_s[i + 1] * 1000
    audio = np.concatenate(parts)
    va = VoiceActivity(load_silero_vad(), VadConfig())
    for i in range(0, len(audio), 320):  # 20 ms chunks, as a live sender
        va.push(audio[i : i + 320])
    segs = va.finish()
    assert len(segs) == len(truth), [(s.start_ms, s.end_ms) for s in segs]
    for seg, (a, b) in zip(segs, truth, strict=True):
        assert abs(seg.start_ms - a) <= 100 and abs(seg.end_ms - b) <= 100, (seg, a, b)


def test_speech_gate_cross_fades():
    gate = SpeechGate(crossfade_frames=3)
    w = [gate.step(s) for s in [False, True, True, True, True, False, False, False, False]]
    assert w == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3, 0, 0])
    hard = SpeechGate(crossfade_frames=0)
    assert [hard.step(s) for s in (True, False)] == [1.0, 0.0]


# --- commands --------------------------------------------------------------------------------


def test_audio_check_reports_vad_error_delay_cost_and_plots(fixture_file, tmp_path, capsys):
    png = tmp_path / "check.png"
    code = main(
        [
            "audio",
            "check",
            "--audio",
            str(fixture_file("yongen.wav")),
            "--weights",
            "tiny",
            "--stream-hop",
            "25",
            "--plot",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    s = json.loads(out.strip().splitlines()[-1])
    assert s["frames"] == 200 and s["duration_s"] == 8.0
    assert len(s["speech_segments"]) >= 1 and 3.0 < s["speech_s"] < 8.0
    assert s["feature_error"]["frames"] == 200 and s["added_delay_ms"] == 24 * 40 + 80
    assert s["extractor_cost"]["ms_per_frame"] > 0 and s["input"]["samples_in"] == 8 * 48000
    assert "random weights" in out  # says the error means nothing with random weights
    assert png.stat().st_size > 1000


def test_audio_check_bad_inputs_one_line(tmp_path, capsys):
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    cases = {
        "missing": (["--audio", str(tmp_path / "nope.wav")], "not found"),
        "not audio": (["--audio", str(text)], "not an audio file"),
        "empty": (["--audio", str(empty)], "no audio samples"),
        "bad look-ahead": (
            ["--audio", str(empty), "--stream-lookahead-ms", "30"],
            "multiple of 20",
        ),
    }
    for name, (argv, expect) in cases.items():
        code = main(["audio", "check", "--weights", "tiny", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and expect in err, (name, err)


def test_render_streaming_path(yongen_avatar, fixture_file, tmp_path, capsys):
    clip = load_audio(fixture_file("yongen.wav"))
    short = tmp_path / "short.wav"
    mono = (clip.to_mono_16k()[: 16000 * 4] * 32767).astype(np.int16)  # 4 s: speech then none
    with wave.open(str(short), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(mono.tobytes())
    out = tmp_path / "s.mp4"
    code = main(
        [
            "render",
            "--weights",
            "tiny",
            "--avatars-dir",
            str(yongen_avatar),
            "--avatar",
            "yongen",
            "--audio",
            str(short),
            "--out",
            str(out),
            "--streaming",
            "--stream-hop",
            "5",
            "--batch-size",
            "8",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    s = json.loads(printed.strip().splitlines()[-1])
    assert s["frames"] == 100 and probe_media(out)["video_frames"] == 100
    st = s["streaming"]
    assert st["speech_frames"] + st["idle_frames"] == 100
    assert st["speech_frames"] > 20 and st["idle_frames"] > 0  # the clip starts silent


def test_streaming_and_offline_errors_are_measured_per_frame():
    a = torch.ones(3, 50, 384)
    b = a.clone()
    b[1] *= 1.1
    np.testing.assert_allclose(frame_errors(b, a), [0, 0.1, 0], atol=1e-6)


def test_batched_encoder_serves_many_streams_in_one_call(tiny_models):
    import threading

    from musetalk_rt.audio.incremental import encode_canvases

    whisper, fe = tiny_models.whisper, tiny_models.feature_extractor
    rng = np.random.default_rng(0)
    canvases = [rng.standard_normal(16000 * (i + 1)).astype(np.float32) * 0.1 for i in range(4)]
    shared = BatchedEncoder(whisper, fe, max_batch=8, gather_ms=300)
    results = {}

    def call(i):
        results[i] = shared.encode([canvases[i]])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.close()
    ref = encode_canvases(whisper, fe, canvases, torch.float32)
    for i in range(4):
        torch.testing.assert_close(results[i][0], ref[i], rtol=1e-4, atol=1e-4)
    assert shared.canvases == 4 and shared.calls < 4  # gathered into fewer calls
    # an extractor given the shared encoder gives the same windows as one on its own
    audio = rng.standard_normal(16000 * 2).astype(np.float32) * 0.1
    cfg = StreamingConfig(hop_frames=25)
    alone, _ = stream_windows(whisper, fe, audio, cfg, 3200)
    shared = BatchedEncoder(whisper, fe)
    ex = IncrementalFeatureExtractor(whisper, fe, cfg, shared=shared)
    parts = [ex.push(audio[i : i + 3200]) for i in range(0, len(audio), 3200)] + [ex.flush()]
    shared.close()
    together = torch.cat([p.windows for p in parts if p is not None])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_canvas_encoder_equals_the_reference_path(tiny_models, tiny_en):
    """The live canvas engine (device log-mel, buckets, fp16) against ``encode_canvases``."""
    from musetalk_rt.audio.canvas_engine import CanvasEncoder
    from musetalk_rt.audio.incremental import encode_canvases

    whisper, fe = tiny_models.whisper, tiny_models.feature_extractor
    rng = np.random.default_rng(3)
    # a short canvas, a long one, one past 30 s (cut, as the feature extractor cuts it)
    canvases = [
        (rng.standard_normal(n) * 0.1).astype(np.float32) for n in (3_200, 160_000, 500_000)
    ]
    ref = encode_canvases(whisper, fe, canvases, torch.float32)
    enc = CanvasEncoder(whisper, fe, buckets=(1, 2))  # 3 canvases: two calls, one padded
    torch.testing.assert_close(enc(canvases), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc(canvases[:1]), ref[:1], rtol=1e-5, atol=1e-5)
    assert enc.bucket(2) == 2 and enc.describe().startswith("whisper canvases: float32 on cpu")
    with pytest.raises(ValueError, match="at most 2"):
        enc.bucket(3)
    # fp16 on the trained tiny.en: the error the live process prints at start
    en, en_fe = tiny_en
    err = CanvasEncoder(en, en_fe, dtype=torch.float16).check(
        lambda c: encode_canvases(en, en_fe, c, torch.float32)
    )
    assert 0 < err < 1e-2
    # through the shared batcher, as the live process runs it
    shared = BatchedEncoder(whisper, fe, max_batch=2, engine=enc)
    torch.testing.assert_close(shared.encode(canvases), ref, rtol=1e-5, atol=1e-5)
    shared.close()


def test_extractor_stats_stay_bounded_over_a_long_session():
    """25 encoder calls a second for hours: the median reads the last calls only, the mean per
    frame every call's."""
    from musetalk_rt.audio.incremental import CALL_MS_KEPT, ExtractorStats

    st = ExtractorStats()
    for i in range(CALL_MS_KEPT + 500):
        st.add_call(2.0 if i < 500 else 4.0)
    st.frames = CALL_MS_KEPT + 500
    assert len(st.call_ms) == CALL_MS_KEPT
    assert st.as_dict()["call_ms_p50"] == 4.0
    assert st.ms_per_frame == (500 * 2.0 + CALL_MS_KEPT * 4.0) / (CALL_MS_KEPT + 500)


def test_render_table_keeps_its_columns_and_prints_no_python_dict():
    from musetalk_rt.pipeline import RenderReport

    rep = RenderReport(
        out="o.mp4",
        frames=50,
        audio_s=2.0,
        wall_s=4.0,
        stage_ms={"unet": 100.0, "prepare(engine build)": 0.9},
        engines=[],
        weights="weights: tiny",
        batch_size=8,
        extra={
            "streaming": "hop 1",
            "speech_frames": 40,
            "idle_frames": 10,
            "extractor": {"encoder_calls": 50, "skipped": 0},
        },
    )
    lines = rep.table().splitlines()
    header = next(line for line in lines if line.startswith("stage"))
    rows = [line for line in lines if line.startswith(("unet", "prepare"))]
    assert all(len(r) == len(header) for r in rows)  # right-aligned columns end together
    assert lines[-1].endswith("extractor encoder_calls 50, skipped 0") and "{" not in lines[-1]
