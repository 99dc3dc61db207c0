"""Reading and writing media: audio clips, images, videos and H.264/AAC MP4 files.

Everything goes through PyAV (FFmpeg's libraries) and Pillow, so no ``ffmpeg`` binary is needed
at run time. Audio is kept at its original sample rate and channel count until a consumer asks
for the 16 kHz mono signal that Whisper (and so MuseTalk) expects; :meth:`AudioClip.to_mono_16k`
reproduces ``librosa.load(path, sr=16000)`` (channel average, then soxr "HQ" resampling).

Bad input (a missing file, a text file named ``.wav``, an empty or corrupt video, NaN samples)
raises :class:`~musetalk_rt.errors.UserError` with one line naming the file and the problem;
exceptions from PyAV, Pillow or NumPy never escape for bad input.

:class:`Mp4Writer` writes the rendered avatar: H.264 (libx264, yuv420p) at a constant frame rate
with exact timestamps, plus the driving audio as AAC, interleaved as frames arrive. It writes to
a temporary file next to the target and renames it on success, so a crash never leaves a
half-written file behind. :class:`BackgroundWriter` runs any such writer in a thread of its own
behind a bounded queue, so that an offline render's encoding overlaps its GPU work (PyAV
releases the interpreter lock while x264 encodes); :class:`InlineWriter` is the same interface
without the thread, for a model that shares the CPU's cores with the encoder.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import soxr
from PIL import Image, ImageOps, UnidentifiedImageError

from musetalk_rt.errors import UserError

SAMPLE_RATE = 16_000  # whisper's input rate: the audio timeline of the whole package
FPS = 25  # MuseTalk's frame rate: 640 samples of audio per video frame
WHISPER_SAMPLE_RATE = SAMPLE_RATE
DEFAULT_FPS = float(FPS)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

# Sample rates the AAC encoder accepts; clips at other rates are resampled to 48 kHz on write.
_AAC_SAMPLE_RATES = frozenset(
    {96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350}
)
_AAC_FALLBACK_RATE = 48000
_AAC_FRAME_SIZE = 1024  # samples per AAC frame (the codec's frame_size once opened)

# Divisors that map integer PCM sample formats onto [-1, 1].
_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


@dataclass
class AudioClip:
    """Decoded audio at its original sample rate.

    Attributes:
        samples: ``[C, N]`` float32 in [-1, 1]; C channels of N samples each.
        sample_rate: Samples per second per channel.
        source: Where the audio came from (a path), for messages; may be empty.
    """

    samples: np.ndarray
    sample_rate: int
    source: str = ""

    @property
    def channels(self) -> int:
        """Number of channels (C)."""
        return int(self.samples.shape[0])

    @property
    def num_samples(self) -> int:
        """Samples per channel (N)."""
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return self.num_samples / float(self.sample_rate)

    def to_mono_16k(self) -> np.ndarray:
        """Return the clip as the 16 kHz mono signal Whisper expects.

        Mirrors ``librosa.load(path, sr=16000)`` as MuseTalk uses it: channels are averaged, then
        resampled with soxr at "HQ" quality (skipped when the clip is already 16 kHz).

        Returns:
            ``[N16]`` float32, N16 ≈ duration_s × 16000.
        """
        mono = self.samples.mean(axis=0, dtype=np.float32)  # [N] float32
        if self.sample_rate == WHISPER_SAMPLE_RATE:
            return np.ascontiguousarray(mono, dtype=np.float32)
        out = soxr.resample(mono, self.sample_rate, WHISPER_SAMPLE_RATE, quality="HQ")
        return np.ascontiguousarray(out, dtype=np.float32)  # [N16] float32


def _check_exists(path: Path, kind: str) -> None:
    """Raise a UserError unless ``path`` is a readable file; ``kind`` is e.g. "audio"."""
    if not path.exists():
        raise UserError(f"{kind} file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; expected {kind} file")
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from err


def _open_input(path: Path, what: str, not_media_hint: str) -> av.container.InputContainer:
    """Open ``path`` with PyAV, turning FFmpeg errors into one-line UserErrors."""
    try:
        return av.open(str(path), mode="r")
    except av.FFmpegError as err:
        raise UserError(f"{path} is not {what} file ({not_media_hint})") from err
    except (OSError, ValueError) as err:
        raise UserError(f"cannot open {path}: {err}") from err


def _av_reason(err: av.FFmpegError) -> str:
    """FFmpeg's one-phrase reason for an error, without errno and file name."""
    return getattr(err, "strerror", None) or str(err)


def _frame_to_float(frame: av.AudioFrame) -> np.ndarray:
    """Convert one decoded audio frame to ``[C, n]`` float32, whatever its sample format."""
    arr = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:  # packed: [1, n * C], interleaved
        arr = arr.reshape(-1, channels).T  # [C, n]
    name = frame.format.name.rstrip("p")  # "s16p" -> "s16", "fltp" -> "flt"
    if name in ("flt", "dbl"):
        return arr.astype(np.float32, copy=False)
    if name == "u8":
        return (arr.astype(np.float32) - 128.0) / _INT_SCALE["u8"]
    if name in _INT_SCALE:
        return (arr.astype(np.float64) / _INT_SCALE[name]).astype(np.float32)
    raise ValueError(f"unsupported sample format {frame.format.name}")


def load_audio(path: str | os.PathLike) -> AudioClip:
    """Decode an audio file (wav, mp3, flac, m4a, the audio track of a video...).

    Keeps the original sample rate and all channels.

    Args:
        path: The file to read.

    Returns:
        An :class:`AudioClip` with ``[C, N]`` float32 samples in [-1, 1].

    Raises:
        UserError: The file is missing, is not decodable media, has no audio stream, holds no
            samples, or holds non-finite (NaN/inf) samples.
    """
    path = Path(path)
    _check_exists(path, "audio")
    hint = "FFmpeg cannot decode it; give a .wav, .mp3, .flac or .m4a file"
    container = _open_input(path, "an audio", hint)
    chunks: list[np.ndarray] = []  # each [C, n] float32
    sample_rate = 0
    channels = 0
    try:
        if not container.streams.audio:
            raise UserError(f"{path} has no audio stream; give a file that contains sound")
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            if frame.samples == 0:
                continue
            if not chunks:
                sample_rate, channels = frame.sample_rate, frame.layout.nb_channels
            elif (frame.sample_rate, frame.layout.nb_channels) != (sample_rate, channels):
                raise UserError(
                    f"{path} changes sample rate or channel count mid-stream; re-encode it, "
                    f"e.g. ffmpeg -i {path} -ar 48000 fixed.wav"
                )
            chunks.append(_frame_to_float(frame))
    except av.FFmpegError as err:
        raise UserError(f"{path} could not be decoded (corrupt audio?): {_av_reason(err)}") from err
    except ValueError as err:
        raise UserError(f"{path} could not be decoded: {err}") from err
    finally:
        container.close()

    if not chunks:
        raise UserError(f"{path} contains no audio samples")
    samples = np.concatenate(chunks, axis=1)  # [C, N] float32
    if samples.shape[1] == 0:
        raise UserError(f"{path} contains no audio samples")
    if not np.isfinite(samples).all():
        raise UserError(f"{path} contains non-finite audio samples (NaN or infinity)")
    np.clip(samples, -1.0, 1.0, out=samples)  # float files may overshoot full scale
    return AudioClip(samples=samples, sample_rate=int(sample_rate), source=str(path))


# --------------------------------------------------------------------------------------------
# Images and videos
# --------------------------------------------------------------------------------------------


def decode_audio_bytes(data: bytes, rate: int = 16_000) -> np.ndarray:
    """An encoded audio file held in memory (any format FFmpeg reads) as mono float32.

    Args:
        data: The file's bytes (a WAV of any flavour, MP3, Opus in Ogg, …).
        rate: Output sample rate.

    Returns:
        ``[N]`` float32 at ``rate`` (``N`` = 0 when the data holds no samples).

    Raises:
        av.FFmpegError: The data is not decodable media.
    """
    import io

    with av.open(io.BytesIO(data)) as c:
        res = av.AudioResampler(format="flt", layout="mono", rate=rate)
        parts = []
        for frame in c.decode(audio=0):
            parts += [f.to_ndarray().reshape(-1) for f in res.resample(frame)]
        parts += [f.to_ndarray().reshape(-1) for f in res.resample(None)]  # the resampler's tail
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def check_frames(frames: list[np.ndarray], source: str | os.PathLike = "") -> None:
    """Check that decoded frames are usable: at least one, each ``[H, W, 3]`` uint8, H, W > 0.

    Args:
        frames: The frames to check.
        source: What they came from (a path), named in the message.

    Raises:
        UserError: No frames, or a frame with zero width/height or the wrong shape.
    """
    name = str(source) or "the input"
    if len(frames) == 0:
        raise UserError(f"{name} contains no frames")
    for i, frame in enumerate(frames):
        shape = getattr(frame, "shape", ())
        if len(shape) != 3 or shape[2] != 3:
            raise UserError(f"{name}: frame {i} has shape {shape}, expected [H, W, 3] RGB")
        if shape[0] == 0 or shape[1] == 0:
            raise UserError(f"{name} has zero-pixel frames ({shape[1]}x{shape[0]})")
        if frame.dtype != np.uint8:
            raise UserError(f"{name}: frame {i} has dtype {frame.dtype}, expected uint8")


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any Pillow image mode to ``[H, W, 3]`` uint8 RGB."""
    if img.mode.startswith("I;16") or img.mode == "I":
        gray = np.asarray(img).astype(np.int64)  # [H, W]
        if img.mode != "I" or gray.max(initial=0) > 255:  # 16-bit data: keep the top byte
            gray = gray >> 8
        gray = np.clip(gray, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "P":  # palette (maybe with transparency): expand through RGBA
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")  # drops alpha; grayscale, CMYK, LA... become RGB
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB, applying its EXIF orientation.

    Args:
        path: The image (png, jpg, bmp, webp, tiff, ...).

    Returns:
        ``[H, W, 3]`` uint8 RGB.

    Raises:
        UserError: The file is missing, cannot be decoded as an image, or has zero pixels.
    """
    path = Path(path)
    _check_exists(path, "image")
    try:
        with Image.open(path) as img:
            img.load()
            if img.width == 0 or img.height == 0:
                raise UserError(f"{path} has zero pixels ({img.width}x{img.height})")
            img = ImageOps.exif_transpose(img) or img
            rgb = _pil_to_rgb(img)  # [H, W, 3] uint8
    except UserError:
        raise
    except UnidentifiedImageError as err:
        raise UserError(f"{path} is not a readable image (unknown format or corrupt)") from err
    except Exception as err:  # Pillow raises many types for corrupt data (OSError, SyntaxError...)
        raise UserError(f"{path} is not a readable image ({type(err).__name__}: {err})") from err
    check_frames([rgb], path)
    return rgb


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    """Frames per second from the stream's average rate, else its guessed rate, else 25."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and rate > 0:
            fps = float(rate)
            if np.isfinite(fps):
                return fps
    return DEFAULT_FPS


def read_video(
    path: str | os.PathLike, max_frames: int | None = None
) -> tuple[list[np.ndarray], float]:
    """Decode the frames of a video's first video stream.

    All frames are held in memory (a 704×1216 frame is 2.5 MB), so pass ``max_frames`` for
    long inputs.

    Args:
        path: The video file.
        max_frames: Stop after this many frames; ``None`` decodes all.

    Returns:
        ``(frames, fps)``: frames are ``[H, W, 3]`` uint8 RGB; fps from the stream's average rate
        (25.0 if unknown).

    Raises:
        UserError: The file is missing, corrupt, has no video stream or yields no frames.
    """
    path = Path(path)
    _check_exists(path, "video")
    if max_frames is not None and max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    hint = "it is corrupt or not a video FFmpeg can decode"
    container = _open_input(path, "a video", hint)
    frames: list[np.ndarray] = []
    try:
        if not container.streams.video:
            raise UserError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads: much faster decoding
        fps = _stream_fps(stream)
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3] uint8
            if max_frames is not None and len(frames) >= max_frames:
                break
    except av.FFmpegError as err:
        raise UserError(f"{path} could not be decoded (corrupt video?): {_av_reason(err)}") from err
    except ValueError as err:
        raise UserError(f"{path} could not be decoded: {err}") from err
    finally:
        container.close()
    if not frames:
        raise UserError(f"{path} contains no decodable video frames")
    check_frames(frames, path)
    return frames, fps


def load_source(
    path: str | os.PathLike, max_frames: int | None = None
) -> tuple[list[np.ndarray], float]:
    """Load an avatar source: a still image (one frame at 25 fps) or a video.

    Files with an image extension are read as images first, falling back to video decoding
    (e.g. an animated webp); anything else is decoded as a video.

    Args:
        path: An image or video file.
        max_frames: Decode at most this many frames of a video (a long video's frames would
            not fit in memory); ``None`` decodes all.

    Returns:
        ``(frames, fps)`` with frames ``[H, W, 3]`` uint8 RGB.

    Raises:
        UserError: Missing, undecodable, or empty input, or zero-pixel frames.
    """
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        _check_exists(path, "image")
        try:
            frames = [read_image(path)]
        except UserError as image_err:
            try:
                frames, fps = read_video(path, max_frames)
            except UserError:
                raise image_err from None
            check_frames(frames, path)
            return frames, fps
        return frames, DEFAULT_FPS
    frames, fps = read_video(path, max_frames)
    check_frames(frames, path)
    return frames, fps


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _writer_audio(audio: AudioClip) -> tuple[np.ndarray, int, str]:
    """Prepare a clip for AAC: ``([C, N] float32 contiguous, sample_rate, layout)``.

    Clips with more than two channels are averaged to mono; rates AAC cannot store are
    resampled to 48 kHz.
    """
    samples = np.asarray(audio.samples, dtype=np.float32)  # [C, N]
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise ValueError(f"audio samples must be [C, N], got shape {samples.shape}")
    if samples.shape[1] == 0:
        raise ValueError("audio clip has no samples")
    if samples.shape[0] > 2:
        samples = samples.mean(axis=0, keepdims=True)  # [1, N]
    rate = int(audio.sample_rate)
    if rate not in _AAC_SAMPLE_RATES:
        resampled = soxr.resample(samples.T, rate, _AAC_FALLBACK_RATE, quality="HQ")  # [N', C]
        samples = np.asarray(resampled, dtype=np.float32).reshape(-1, samples.shape[0]).T
        rate = _AAC_FALLBACK_RATE
    samples = np.ascontiguousarray(np.clip(samples, -1.0, 1.0), dtype=np.float32)
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    return samples, rate, layout


X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)  # x264's speed presets, fastest first


MP4_SUFFIXES = (".mp4", ".m4v", ".mov")  # names of MP4 files (what an Mp4Writer takes)


def check_mp4_path(path: str | os.PathLike, what: str = "the output") -> Path:
    """``path`` as a file an :class:`Mp4Writer` may write, checked before any work.

    Raises:
        UserError: A folder, a name that is not an MP4's, or a folder under a file.
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {path} is a folder; name a file in it, e.g. {p / 'render.mp4'}")
    if p.suffix.lower() not in MP4_SUFFIXES:
        raise UserError(f"{what} {path}: this writes an MP4 (H.264 + AAC); name it .mp4")
    first = next((q for q in p.parents if q.exists()), None)  # (the rest is made)
    if first is not None and not first.is_dir():
        raise UserError(f"{what} {path}: {first} is a file, not a folder")
    return p


class Mp4Writer:
    """Write RGB frames (and optionally audio) to an H.264/AAC MP4 file.

    Video is libx264, yuv420p, at a constant ``fps``: the encoder time base is 1/fps and frame i
    has pts i. yuv420p needs even dimensions, so for an odd width or height the right column /
    bottom row is repeated once (edge replication) and the file is one pixel wider / taller.

    Audio (if given) is AAC at the clip's sample rate (48 kHz for rates AAC cannot store) in mono
    or stereo (more channels are averaged to mono). It is encoded as frames arrive, up to the
    media time of the last video frame, and the rest of the clip is flushed on close, so the
    whole clip is in the file even if it is longer than the video.

    The file is written to a temporary name next to ``path`` and renamed on a successful
    :meth:`close`; if the ``with`` block raises, the temporary file is removed.

    Args:
        path: Output file, named .mp4, .m4v or .mov (:func:`check_mp4_path`); parent
            folders are created.
        width: Frame width in pixels of the frames passed to :meth:`write`.
        height: Frame height in pixels.
        fps: Frames per second.
        audio: Audio track to mux, or None for a silent video.
        crf: x264 constant rate factor (lower = better quality, larger file).
        preset: x264 speed preset.
        metadata: Container tags, e.g. ``{"comment": "synthetic weights"}``; any key is kept.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: int = 25,
        audio: AudioClip | None = None,
        crf: int = 18,
        preset: str = "veryfast",
        metadata: dict[str, str] | None = None,
    ):
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if preset not in X264_PRESETS:
            raise UserError(
                f"unknown x264 preset {preset!r}; choose one of {', '.join(X264_PRESETS)}"
            )
        self.path = check_mp4_path(path)
        self.width = int(width)
        self.height = int(height)
        self.fps = int(fps)
        self.frames_written = 0
        self._pad_w = self.width % 2  # extra columns on the right for yuv420p
        self._pad_h = self.height % 2  # extra rows at the bottom
        self._closed = False

        self._audio: np.ndarray | None = None  # [C, N] float32
        self._audio_rate = 0
        self._audio_layout = ""
        self._audio_pos = 0  # samples of self._audio already sent to the encoder
        if audio is not None:
            self._audio, self._audio_rate, self._audio_layout = _writer_audio(audio)

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the folder for {self.path}: {err}") from err
        self._tmp_path = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.part")
        # use_metadata_tags keeps arbitrary keys; the default mov muxer drops unknown ones.
        container_options = {"movflags": "use_metadata_tags"} if metadata else {}
        try:
            self._container = av.open(
                str(self._tmp_path), mode="w", format="mp4", container_options=container_options
            )
        except (av.FFmpegError, OSError) as err:
            raise UserError(f"cannot write {self.path}: {err}") from err

        try:
            for key, value in (metadata or {}).items():
                self._container.metadata[str(key)] = str(value)
            self._video = self._container.add_stream(
                "libx264", rate=self.fps, options={"crf": str(crf), "preset": preset}
            )
            self._video.width = self.width + self._pad_w
            self._video.height = self.height + self._pad_h
            self._video.pix_fmt = "yuv420p"
            self._video.time_base = Fraction(1, self.fps)
            self._audio_stream = None
            if self._audio is not None:
                self._audio_stream = self._container.add_stream(
                    "aac", rate=self._audio_rate, layout=self._audio_layout
                )
                self._audio_stream.time_base = Fraction(1, self._audio_rate)
            self._container.start_encoding()  # opens the encoders: frame_size becomes known
            self._audio_frame_size = _AAC_FRAME_SIZE
            if self._audio_stream is not None and self._audio_stream.codec_context.frame_size:
                self._audio_frame_size = self._audio_stream.codec_context.frame_size
        except BaseException:
            self.abort()
            raise

    @property
    def audio_sent_s(self) -> float:
        """Seconds of audio handed to the AAC encoder so far (0.0 without audio)."""
        return self._audio_pos / self._audio_rate if self._audio_rate else 0.0

    # ---- context manager -------------------------------------------------------------------

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    # ---- writing ---------------------------------------------------------------------------

    def write(self, frame: np.ndarray) -> None:
        """Encode one frame.

        Args:
            frame: ``[height, width, 3]`` uint8 RGB.

        Raises:
            ValueError: Wrong shape or dtype, or the writer is closed.
        """
        if self._closed:
            raise ValueError(f"Mp4Writer for {self.path} is closed")
        if not isinstance(frame, np.ndarray) or frame.shape != (self.height, self.width, 3):
            shape = getattr(frame, "shape", None)
            raise ValueError(f"expected a [{self.height}, {self.width}, 3] frame, got {shape}")
        if frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 frame, got {frame.dtype}")
        if self._pad_w or self._pad_h:
            frame = np.pad(frame, ((0, self._pad_h), (0, self._pad_w), (0, 0)), mode="edge")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts = self.frames_written
        video_frame.time_base = Fraction(1, self.fps)
        self._container.mux(self._video.encode(video_frame))
        self.frames_written += 1
        if self._audio is not None:
            # Audio up to the end of this frame's display time, in whole AAC frames.
            media_end = self.frames_written * self._audio_rate // self.fps
            self._encode_audio(min(media_end, self._audio.shape[1]), final=False)

    def _encode_audio(self, end: int, final: bool) -> None:
        """Send samples [pos, end) to the AAC encoder in codec-sized frames.

        Unless ``final``, a trailing partial frame is held back for the next call (the encoder
        accepts a short frame only as the last one).
        """
        assert self._audio is not None and self._audio_stream is not None
        size = self._audio_frame_size
        while self._audio_pos < end:
            count = min(size, end - self._audio_pos)
            if count < size and not final:
                break
            chunk = self._audio[:, self._audio_pos : self._audio_pos + count]  # [C, count]
            audio_frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(chunk), format="fltp", layout=self._audio_layout
            )
            audio_frame.sample_rate = self._audio_rate
            audio_frame.pts = self._audio_pos
            audio_frame.time_base = Fraction(1, self._audio_rate)
            self._container.mux(self._audio_stream.encode(audio_frame))
            self._audio_pos += count

    def close(self) -> int:
        """Flush the encoders, finish the file and move it to ``path``.

        Returns:
            The number of video frames written.
        """
        if self._closed:
            return self.frames_written
        try:
            if self._audio is not None:
                self._encode_audio(self._audio.shape[1], final=True)
                self._container.mux(self._audio_stream.encode(None))
            self._container.mux(self._video.encode(None))
            self._container.close()
            self._closed = True
            os.replace(self._tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        return self.frames_written

    def abort(self) -> None:
        """Stop writing and delete the temporary file; ``path`` is left untouched."""
        self._closed = True
        container = getattr(self, "_container", None)
        if container is not None:
            with contextlib.suppress(Exception):  # best effort: the file is deleted next
                container.close()
        with contextlib.suppress(OSError):
            self._tmp_path.unlink(missing_ok=True)


class InlineWriter:
    """:class:`BackgroundWriter`'s interface without the thread: each frame is encoded at once.

    The choice where the model runs on the same CPU cores as the encoder: there the two only
    take turns (on a 2-core host a 60 s render took 81 s with the thread against 72 s without).
    :class:`BackgroundWriter` builds on it (the same timed close of the writer).

    Args:
        writer: The encoder (anything with ``write(frame)`` and ``close()``).
        on_encode: Optional context-manager factory timing each encode.
    """

    def __init__(self, writer, on_encode=None):
        self.writer = writer
        self.waited_s = 0.0  # the render waits for every encode
        self._on_encode = on_encode or contextlib.nullcontext

    def write(self, frame: np.ndarray) -> None:
        """Encode one frame now."""
        t0 = time.perf_counter()
        with self._on_encode():
            self.writer.write(frame)
        self.waited_s += time.perf_counter() - t0

    def close(self):
        """Close the writer (its flush timed as an encode); returns its result."""
        t0 = time.perf_counter()
        with self._on_encode():
            result = self.writer.close()
        self.waited_s += time.perf_counter() - t0
        return result

    def __enter__(self) -> InlineWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None


class BackgroundWriter(InlineWriter):
    """Encode frames in a thread of its own, behind a bounded queue.

    The producer (an offline render's model loop) hands frames over with :meth:`write` and goes
    on while the thread encodes them into ``writer`` (an :class:`Mp4Writer` or anything with
    ``write(frame)``). Overflow policy: when ``max_frames`` frames wait, :meth:`write` blocks
    until the encoder takes one — an offline render drops nothing; the time the producer waited
    (there and in :meth:`close`) is :attr:`waited_s`. An error in the thread is raised by the
    next :meth:`write` or by :meth:`close`, and the frames still queued are then dropped (the
    file is discarded anyway).

    Use it inside the writer's own ``with`` block, so the writer is closed or aborted after the
    thread is done with it::

        with Mp4Writer(path, w, h) as mp4, BackgroundWriter(mp4) as writer:
            writer.write(frame)
            writer.close()

    Args:
        writer: The encoder the thread calls; only that thread touches it until :meth:`close`.
        max_frames: Frames that may wait (each is a full output frame, ~2.5 MB at 704x1216).
        on_encode: Optional context-manager factory timing each encode (e.g. a stage clock's
            ``lambda: clock.stage("encode", on_host=True)``); it runs in the thread.
    """

    def __init__(self, writer, max_frames: int = 32, on_encode=None):
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        super().__init__(writer, on_encode)
        self._queue: queue.Queue = queue.Queue(maxsize=max_frames)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._finishing = False
        self._thread = threading.Thread(target=self._run, name="encode", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            frame = self._queue.get()
            if frame is None or self._stop.is_set():
                return
            try:
                with self._on_encode():
                    self.writer.write(frame)
            except BaseException as err:  # handed to the producer; the thread ends
                self._error = err
                self._stop.set()
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _check_open(self) -> None:
        self._raise_if_failed()
        if self._finishing or not self._thread.is_alive():
            raise ValueError("BackgroundWriter is closed")

    def write(self, frame: np.ndarray) -> None:
        """Queue one frame (blocks while ``max_frames`` wait); raises the thread's error.

        Raises:
            ValueError: The writer was closed (its thread takes nothing more).
        """
        self._check_open()
        t0 = time.perf_counter()
        while True:
            try:
                self._queue.put(frame, timeout=0.1)
                break
            except queue.Full:
                self._check_open()  # the thread ended: its queue will never drain
        self.waited_s += time.perf_counter() - t0

    def close(self):
        """Wait for every queued frame, then close the writer; returns its result.

        The writer's flush is timed as an encode; both waits count in :attr:`waited_s`.
        """
        t0 = time.perf_counter()
        self._finish()
        self._raise_if_failed()
        self.waited_s += time.perf_counter() - t0
        return super().close()

    def _finish(self) -> None:
        self._finishing = True
        if self._thread.is_alive():
            while True:
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        break  # the thread has ended and will take nothing more
        # Wait for the thread even through a second Ctrl-C: the writer's own exit must not
        # close the file while the thread is inside an encode (it ends within one frame).
        interrupted = None
        while self._thread.is_alive():
            try:
                self._thread.join()
            except KeyboardInterrupt as err:
                interrupted = err
        if interrupted is not None:
            raise interrupted

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._stop.set()  # drop what waits: the writer's own exit discards the file
            with contextlib.suppress(queue.Empty):
                while True:
                    self._queue.get_nowait()
        self._finish()


# --------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------


def probe_media(path: str | os.PathLike) -> dict:
    """Describe a media file by demuxing and decoding it (slow but exact).

    Args:
        path: Any media file.

    Returns:
        A dict with ``video_frames`` (decoded count; 0 without video), ``fps``, ``width``,
        ``height``, ``video_codec``, ``video_duration_s`` (frames / fps), ``audio_codec``,
        ``audio_sample_rate``, ``audio_channels``, ``audio_duration_s`` (decoded samples / rate)
        and ``metadata`` (container tags). Absent streams give None (0 frames for video).

    Raises:
        UserError: The file is missing or is not decodable media.
    """
    path = Path(path)
    _check_exists(path, "media")
    container = _open_input(path, "a media", "FFmpeg cannot decode it")
    info: dict = {
        "video_frames": 0,
        "fps": None,
        "width": None,
        "height": None,
        "video_codec": None,
        "video_duration_s": None,
        "audio_codec": None,
        "audio_sample_rate": None,
        "audio_channels": None,
        "audio_duration_s": None,
        "metadata": {},
    }
    try:
        info["metadata"] = dict(container.metadata)
        if container.streams.video:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            info["fps"] = _stream_fps(stream)
            info["width"] = stream.codec_context.width
            info["height"] = stream.codec_context.height
            info["video_codec"] = stream.codec_context.name
            info["video_frames"] = sum(1 for _ in container.decode(stream))
            info["video_duration_s"] = info["video_frames"] / info["fps"]
    except av.FFmpegError as err:
        raise UserError(f"{path} could not be decoded (corrupt media?): {_av_reason(err)}") from err
    finally:
        container.close()

    # Audio in a second pass: decoding one stream at a time keeps each pass simple.
    container = _open_input(path, "a media", "FFmpeg cannot decode it")
    try:
        if container.streams.audio:
            stream = container.streams.audio[0]
            info["audio_codec"] = stream.codec_context.name
            num_samples = 0
            rate = stream.codec_context.sample_rate
            channels = stream.codec_context.channels
            for frame in container.decode(stream):
                num_samples += frame.samples
                rate = frame.sample_rate or rate
                channels = frame.layout.nb_channels or channels
            info["audio_sample_rate"] = rate
            info["audio_channels"] = channels
            info["audio_duration_s"] = num_samples / rate if rate else None
    except av.FFmpegError as err:
        raise UserError(f"{path} could not be decoded (corrupt media?): {_av_reason(err)}") from err
    finally:
        container.close()
    return info
