"""Tests for musetalk_rt.media: decoding, the MP4 writer and bad-input errors."""

from __future__ import annotations

import struct
import threading
import wave
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from musetalk_rt.errors import UserError
from musetalk_rt.media import (
    AudioClip,
    BackgroundWriter,
    InlineWriter,
    Mp4Writer,
    check_frames,
    load_audio,
    load_source,
    probe_media,
    read_image,
    read_video,
)

# ---- helpers --------------------------------------------------------------------------------


def sine_clip(freqs_hz: list[float], duration_s: float, sample_rate: int) -> AudioClip:
    """One sine per channel, amplitude 0.3."""
    t = np.arange(round(duration_s * sample_rate)) / sample_rate
    samples = np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in freqs_hz]).astype(np.float32)
    return AudioClip(samples=samples, sample_rate=sample_rate, source="sine")


def write_float_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write a mono IEEE-float (format 3) WAV by hand."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHHH", 3, 1, sample_rate, sample_rate * 4, 4, 32, 0)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def png_bytes_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (0 is illegal) and no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def gradient_frame(height: int, width: int, index: int) -> np.ndarray:
    """A [H, W, 3] uint8 frame that differs per index."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    frame = np.stack([y + 0 * x, x + 0 * y, np.full((height, width), index * 4.0)], axis=2)
    return np.clip(frame, 0, 255).astype(np.uint8)


# ---- audio ----------------------------------------------------------------------------------


def test_load_audio_stereo_48k(fixture_file):
    clip = load_audio(fixture_file("yongen.wav"))
    assert clip.sample_rate == 48000
    assert clip.channels == 2
    assert clip.samples.dtype == np.float32
    assert clip.duration_s == pytest.approx(8.0, abs=1e-3)
    assert clip.num_samples == clip.samples.shape[1]
    assert -1.0 <= clip.samples.min() and clip.samples.max() <= 1.0
    assert np.abs(clip.samples).max() > 0.05  # real speech, not silence
    mono = clip.to_mono_16k()
    assert mono.dtype == np.float32 and mono.ndim == 1
    assert abs(len(mono) - 8.0 * 16000) <= 2


def test_load_audio_mono_16k(fixture_file):
    clip = load_audio(fixture_file("eng.wav"))
    assert (clip.sample_rate, clip.channels) == (16000, 1)
    assert clip.duration_s == pytest.approx(60.0, abs=1e-3)
    mono = clip.to_mono_16k()
    assert len(mono) == clip.num_samples  # already 16 kHz: no resampling
    np.testing.assert_array_equal(mono, clip.samples[0])


def test_to_mono_16k_keeps_frequency():
    clip = sine_clip([1000.0, 1000.0], duration_s=1.0, sample_rate=48000)
    mono = clip.to_mono_16k()
    assert len(mono) == 16000
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    peak_hz = np.argmax(spectrum) * 16000 / len(mono)
    assert peak_hz == pytest.approx(1000.0, abs=2.0)
    assert np.abs(mono[1000:-1000]).max() == pytest.approx(0.3, abs=0.01)


def test_to_mono_averages_channels():
    samples = np.stack([np.full(160, 0.5), np.full(160, -0.1)]).astype(np.float32)
    mono = AudioClip(samples, 16000).to_mono_16k()
    np.testing.assert_allclose(mono, 0.2, atol=1e-6)


def test_load_audio_float_wav_is_clipped(tmp_path):
    path = tmp_path / "loud.wav"
    write_float_wav(path, 1.5 * np.sin(np.arange(1600) / 10.0), 16000)
    clip = load_audio(path)
    assert (clip.sample_rate, clip.channels, clip.num_samples) == (16000, 1, 1600)
    assert clip.samples.max() == 1.0 and clip.samples.min() == -1.0


# ---- images and videos ----------------------------------------------------------------------


def test_read_video_max_frames(fixture_file):
    frames, fps = read_video(fixture_file("yongen.mp4"), max_frames=5)
    assert fps == 25.0
    assert len(frames) == 5
    assert frames[0].shape == (1216, 704, 3) and frames[0].dtype == np.uint8
    assert frames[0].std() > 10  # a real picture


def test_probe_media_fixture_video(fixture_file):
    info = probe_media(fixture_file("yongen.mp4"))
    assert info["video_frames"] == 268
    assert (info["width"], info["height"], info["fps"]) == (704, 1216, 25.0)
    assert info["video_codec"] == "h264" and info["audio_codec"] is None


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_read_image_modes(tmp_path, mode):
    from PIL import Image

    rgb = gradient_frame(31, 47, 3)
    path = tmp_path / f"img_{mode}.png"
    Image.fromarray(rgb).convert(mode).save(path)
    img = read_image(path)
    assert img.shape == (31, 47, 3) and img.dtype == np.uint8
    if mode in ("RGB", "RGBA"):
        np.testing.assert_array_equal(img, rgb)

    frames, fps = load_source(path)
    assert fps == 25.0 and len(frames) == 1
    np.testing.assert_array_equal(frames[0], img)


# ---- writer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(64, 48), (65, 49)])
def test_mp4_writer_round_trip_with_audio(tmp_path, width, height):
    clip = sine_clip([440.0, 660.0], duration_s=2.0, sample_rate=48000)
    path = tmp_path / "sub" / "out.mp4"
    with Mp4Writer(
        path, width, height, fps=25, audio=clip, metadata={"comment": "synthetic weights"}
    ) as writer:
        for i in range(50):
            writer.write(gradient_frame(height, width, i))
            # Audio is encoded as video goes, never ahead by more than one AAC frame.
            video_time_s = (i + 1) / 25
            assert video_time_s - 1024 / 48000 <= writer.audio_sent_s <= video_time_s + 1e-9
    assert writer.close() == 50  # closing twice is harmless

    info = probe_media(path)
    assert info["video_frames"] == 50
    assert info["fps"] == 25.0
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert (info["width"], info["height"]) == (width + width % 2, height + height % 2)
    assert info["video_duration_s"] == pytest.approx(2.0)
    assert (info["audio_sample_rate"], info["audio_channels"]) == (48000, 2)
    assert info["audio_duration_s"] == pytest.approx(2.0, abs=0.05)
    assert info["metadata"]["comment"] == "synthetic weights"
    assert [p.name for p in path.parent.iterdir()] == ["out.mp4"]  # no temp file left

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt == "yuv420p"
        times = [float(f.pts * f.time_base) for f in container.decode(stream)]
    np.testing.assert_allclose(times, np.arange(50) / 25, atol=1e-6)

    frames, fps = read_video(path, max_frames=3)
    assert fps == 25.0
    decoded = frames[1][:height, :width].astype(np.int16)
    assert np.abs(decoded - gradient_frame(height, width, 1)).mean() < 3  # lossy but close
    if width % 2:  # padding replicates the last column
        assert np.abs(frames[1][:, -1].astype(int) - frames[1][:, -2].astype(int)).mean() < 3

    audio = load_audio(path)  # the audio track of a video
    assert (audio.sample_rate, audio.channels) == (48000, 2)
    spectrum = np.abs(np.fft.rfft(audio.samples[0, 4800:52800]))
    assert np.argmax(spectrum) * audio.sample_rate / 48000 == pytest.approx(440, abs=2)


def test_mp4_writer_mono_audio_longer_than_video(tmp_path):
    clip = sine_clip([300.0], duration_s=1.3, sample_rate=16000)
    path = tmp_path / "mono.mp4"
    with Mp4Writer(path, 32, 32, audio=clip) as writer:
        for i in range(10):  # 0.4 s of video
            writer.write(gradient_frame(32, 32, i))
    info = probe_media(path)
    assert info["video_frames"] == 10
    assert (info["audio_sample_rate"], info["audio_channels"]) == (16000, 1)
    assert info["audio_duration_s"] == pytest.approx(1.3, abs=1024 / 16000 + 1e-9)


def test_mp4_writer_without_audio(tmp_path):
    path = tmp_path / "silent.mp4"
    with Mp4Writer(path, 16, 16, fps=25) as writer:
        writer.write(np.zeros((16, 16, 3), np.uint8))
        with pytest.raises(ValueError):
            writer.write(np.zeros((16, 18, 3), np.uint8))
        with pytest.raises(ValueError):
            writer.write(np.zeros((16, 16, 3), np.float32))
    info = probe_media(path)
    assert info["video_frames"] == 1 and info["audio_codec"] is None
    frames, fps = load_source(path)  # a video path goes through read_video
    assert len(frames) == 1 and frames[0].shape == (16, 16, 3) and fps == 25.0


def _x264_options(path: Path) -> str:
    """The settings x264 writes into its first packet (an SEI message: "options: cabac=…")."""
    with av.open(str(path)) as container:
        data = bytes(next(container.demux(video=0)))
    return data.split(b"options: ", 1)[1].split(b"\x00", 1)[0].decode("ascii", "replace")


@pytest.mark.parametrize(("preset", "subme"), [("ultrafast", 0), ("veryfast", 2), ("medium", 7)])
def test_mp4_writer_preset_reaches_x264(tmp_path, preset, subme):
    path = tmp_path / f"{preset}.mp4"
    with Mp4Writer(path, 32, 32, preset=preset) as writer:
        writer.write(gradient_frame(32, 32, 0))
    assert f" subme={subme} " in _x264_options(path)  # the preset's sub-pixel refinement level


def test_mp4_writer_unknown_preset_is_one_clear_error_and_no_file(tmp_path):
    with pytest.raises(UserError, match="unknown x264 preset 'turbo'; choose one of ultrafast,"):
        Mp4Writer(tmp_path / "t.mp4", 32, 32, preset="turbo")
    assert list(tmp_path.iterdir()) == []


def test_mp4_writer_exception_leaves_no_file(tmp_path):
    path = tmp_path / "crash.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(path, 32, 32, audio=sine_clip([440.0], 1.0, 48000)) as writer:
            for i in range(5):
                writer.write(gradient_frame(32, 32, i))
            raise RuntimeError("boom")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def _decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_background_writer_writes_the_same_file_as_inline(tmp_path):
    """The thread changes when frames are encoded, not what: same frames, same order, same
    audio, the stage timer called once per frame (in the thread)."""
    clip = sine_clip([440.0], duration_s=1.2, sample_rate=16000)
    frames = [gradient_frame(48, 64, i) for i in range(30)]
    timed = []

    class Timer:
        def __enter__(self):
            timed.append(threading.current_thread().name)

        def __exit__(self, *exc):
            return None

    results = {}
    for name, make in (
        ("inline", lambda mp4: InlineWriter(mp4, on_encode=Timer)),
        ("thread", lambda mp4: BackgroundWriter(mp4, max_frames=4, on_encode=Timer)),
    ):
        path = tmp_path / f"{name}.mp4"
        with Mp4Writer(path, 64, 48, audio=clip) as mp4, make(mp4) as writer:
            for frame in frames:
                writer.write(frame)
            results[name] = (writer.close(), path)
    assert results["inline"][0] == results["thread"][0] == 30
    a, b = (_decoded(results[k][1]) for k in ("inline", "thread"))
    assert len(a) == len(b) == 30 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert probe_media(results["thread"][1])["audio_duration_s"] == pytest.approx(1.2, abs=0.07)
    assert timed == ["MainThread"] * 31 + ["encode"] * 30 + ["MainThread"]  # + each flush


class _GatedWriter:
    """Takes a frame only when the gate is open; fails on frame ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.gate = threading.Event()
        self.taken: list[int] = []
        self.fail_at = fail_at
        self.closed = False

    def write(self, frame):
        self.gate.wait()
        if len(self.taken) == self.fail_at:
            raise OSError("No space left on device")
        self.taken.append(int(frame))

    def close(self):
        self.closed = True
        return len(self.taken)


def test_background_writer_blocks_when_full_and_drops_nothing():
    sink = _GatedWriter()
    writer = BackgroundWriter(sink, max_frames=2)
    for i in range(3):  # one in the encoder's hands, two waiting
        writer.write(i)
    fourth = threading.Thread(target=writer.write, args=(3,))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive()  # the queue is full and the encoder is held: write blocks
    sink.gate.set()
    fourth.join(10)
    assert not fourth.is_alive()
    assert writer.close() == 4 and sink.taken == [0, 1, 2, 3] and sink.closed
    assert writer.waited_s >= 0.25  # the fourth write waited at least while it was held above
    with pytest.raises(ValueError, match="closed"):  # never dropped quietly, never hangs
        writer.write(4)


def test_background_writer_hands_the_encoder_error_to_the_producer():
    sink = _GatedWriter(fail_at=2)
    sink.gate.set()
    writer = BackgroundWriter(sink, max_frames=1)
    with pytest.raises(OSError, match="No space left"):
        for i in range(100):  # the producer learns of it at a later write, never hangs
            writer.write(i)
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert sink.taken == [0, 1] and not sink.closed


def test_background_writer_error_in_the_render_loop_leaves_no_file(tmp_path):
    path = tmp_path / "crash.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(path, 32, 32) as mp4, BackgroundWriter(mp4, max_frames=2) as writer:
            for i in range(5):
                writer.write(gradient_frame(32, 32, i))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert not writer._thread.is_alive()
    with pytest.raises(ValueError, match="at least 1"):
        BackgroundWriter(InlineWriter(None), max_frames=0)


# ---- bad input ------------------------------------------------------------------------------


def assert_user_error(func, path: Path, *words: str) -> None:
    with pytest.raises(UserError) as info:
        func(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "func", [load_audio, read_image, read_video, load_source, probe_media], ids=lambda f: f.__name__
)
def test_missing_path(tmp_path, func):
    assert_user_error(func, tmp_path / "nope.wav", "not found")


def test_text_file_named_wav(tmp_path):
    path = tmp_path / "speech.wav"
    path.write_text("this is not audio\n" * 20)
    assert_user_error(load_audio, path, "is not an audio file")


def test_wav_with_zero_samples(tmp_path):
    path = tmp_path / "empty.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
    assert_user_error(load_audio, path, "contains no audio samples")


def test_wav_with_nan(tmp_path):
    path = tmp_path / "nan.wav"
    samples = np.zeros(1600, np.float32)
    samples[100] = np.nan
    write_float_wav(path, samples, 16000)
    assert_user_error(load_audio, path, "NaN")


def test_video_without_audio_stream(fixture_file):
    assert_user_error(load_audio, fixture_file("yongen.mp4"), "no audio stream")


def test_audio_without_video_stream(fixture_file):
    assert_user_error(read_video, fixture_file("eng.wav"), "no video stream")


@pytest.mark.parametrize("func", [read_image, load_source], ids=lambda f: f.__name__)
def test_garbage_png(tmp_path, func):
    path = tmp_path / "face.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert_user_error(func, path)


@pytest.mark.parametrize("size", [(0, 0), (0, 5)])
def test_zero_pixel_png(tmp_path, size):
    path = tmp_path / "zero.png"
    path.write_bytes(png_bytes_with_size(*size))
    assert_user_error(read_image, path)
    assert_user_error(load_source, path)


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 10, 3), (10, 0, 3)])
def test_check_frames_zero_pixels(shape):
    with pytest.raises(UserError, match="zero-pixel"):
        check_frames([np.zeros(shape, np.uint8)], "src.png")


def test_check_frames_empty_and_wrong_shape():
    with pytest.raises(UserError, match="no frames"):
        check_frames([], "src.mp4")
    with pytest.raises(UserError, match="expected"):
        check_frames([np.zeros((4, 4), np.uint8)], "src.png")


@pytest.mark.parametrize(
    "func", [read_video, load_source, probe_media, load_audio], ids=lambda f: f.__name__
)
def test_corrupt_mp4(tmp_path, func):
    path = tmp_path / "clip.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(20000))
    assert_user_error(func, path)


def test_truncated_mp4(tmp_path):
    clip_path = tmp_path / "good.mp4"
    with Mp4Writer(clip_path, 32, 32) as writer:
        for i in range(10):
            writer.write(gradient_frame(32, 32, i))
    path = tmp_path / "cut.mp4"
    path.write_bytes(clip_path.read_bytes()[: clip_path.stat().st_size // 2])
    assert_user_error(read_video, path)


def test_directory_is_not_a_file(tmp_path):
    assert_user_error(load_audio, tmp_path, "directory")


def test_frame_time_base_is_exact(tmp_path):
    path = tmp_path / "tb.mp4"
    with Mp4Writer(path, 16, 16, fps=25) as writer:
        for _ in range(3):
            writer.write(np.zeros((16, 16, 3), np.uint8))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(25)


def test_decode_audio_bytes_any_rate_to_mono_16k():
    from musetalk_rt.media import decode_audio_bytes
    from musetalk_rt.speech.utterances import wav_bytes

    tone = (0.3 * np.sin(np.arange(48_000) * 0.05)).astype(np.float32)  # 1 s at 48 kHz
    out = decode_audio_bytes(wav_bytes(tone, 48_000))
    assert out.dtype == np.float32 and abs(out.size - 16_000) <= 32  # the resampler's tail kept
    assert decode_audio_bytes(wav_bytes(np.zeros(0, np.float32), 16_000)).size == 0
    with pytest.raises(av.FFmpegError):
        decode_audio_bytes(b"not audio at all")
