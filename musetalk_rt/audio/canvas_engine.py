"""The live whisper canvas encoder: log-mel on the device, the encoder in fp16, CUDA graphs.

Many live channels each encode one 30 s canvas per frame group (``audio.incremental``); on an
H100 the reference path (:func:`~musetalk_rt.audio.incremental.encode_canvases`: transformers'
feature extractor, which pads every canvas to 30 s in NumPy on the host, then the fp32 encoder
launched op by op) cost 2.4-7 ms per canvas — at 16 channels × 25 canvases/s that alone is more
than the GPU's second (experiments/LOG.md). This engine computes the same thing:

* the canvases' audio is written into one (pinned) host buffer and goes to the device in one
  asynchronous copy per call; the silence after each canvas's audio is a mask on the device
  from its length, not host padding; the log-mel spectrogram is the feature extractor's torch
  formula on the device (same window, filters, clamp and scaling);
* the encoder runs in the serving dtype (fp16 unless the process serves fp32); its output is
  returned as float32, as the reference's;
* on CUDA, one graph per batch bucket (1, 2, 4, 8, 16 canvases) is captured at start-up and
  replayed — no per-op launches from Python under the interpreter lock the other live threads
  need. A batch is padded with silent canvases to its bucket;
* on CUDA all of it runs on the engine's own high-priority stream (:attr:`CanvasEncoder.stream`)
  and a call waits for that stream alone: on the shared default stream every copy and sync of
  the audio path queued behind the GPU worker's UNet/VAE batch (33 ms at batch 16), which made
  the windows of many channels late (experiments/LOG.md). The feature extractors cut their
  windows on the same stream.

The reference stays the definition: :meth:`CanvasEncoder.check` measures the engine against it
and the live process prints the figure at start. If capturing a graph fails, that bucket runs
eagerly and the reason is kept in :attr:`CanvasEncoder.notes` (the show goes on).
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from torch import nn

from musetalk_rt.audio.features import SAMPLE_RATE, SEGMENT_S, whisper_hidden_states

CANVAS_SAMPLES = SEGMENT_S * SAMPLE_RATE  # 480,000
DEFAULT_BUCKETS = (1, 2, 4, 8, 16)
N_FFT, HOP = 400, 160  # whisper's STFT: 25 ms windows every 10 ms


def log_mel(audio: torch.Tensor, mel_filters: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Whisper's log-mel spectrogram of 30 s canvases (the feature extractor's torch formula).

    Args:
        audio: ``[B, 480000]`` float32, 16 kHz, silence after each canvas's audio.
        mel_filters: ``[201, 80]`` float32 (``WhisperFeatureExtractor.mel_filters``).
        window: ``[400]`` Hann window.

    Returns:
        ``[B, 80, 3000]`` float32.
    """
    stft = torch.stft(audio, N_FFT, HOP, window=window, return_complex=True)  # [B, 201, 3001]
    power = stft[..., :-1].abs() ** 2  # [B, 201, 3000]
    mel = mel_filters.T @ power  # [B, 80, 3000]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


class CanvasEncoder:
    """Whisper hidden states of audio canvases: ``[B, 1500, 5, 384]`` float32 (see module doc).

    Args:
        whisper: transformers ``WhisperEncoder`` on its device (fp32; not modified — an fp16
            copy is made when ``dtype`` asks for it).
        feature_extractor: transformers ``WhisperFeatureExtractor`` (its mel filters).
        dtype: Encoder dtype.
        buckets: Batch sizes with their own CUDA graph; a call takes at most the largest.
        cuda_graphs: Capture graphs on a CUDA device (ignored on the CPU).
    """

    def __init__(
        self,
        whisper: nn.Module,
        feature_extractor,
        dtype: torch.dtype = torch.float32,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        cuda_graphs: bool = True,
    ):
        if (feature_extractor.n_fft, feature_extractor.hop_length) != (N_FFT, HOP):
            raise ValueError("the canvas encoder expects whisper's 400-point STFT with hop 160")
        self.device = next(whisper.parameters()).device
        self.dtype = dtype
        self.model = whisper if dtype == torch.float32 else copy.deepcopy(whisper).to(dtype)
        self.buckets = tuple(sorted(set(buckets)))
        self.max_batch = self.buckets[-1]
        self.mel_filters = torch.as_tensor(
            np.asarray(feature_extractor.mel_filters), dtype=torch.float32, device=self.device
        )  # [201, 80]
        self.window = torch.hann_window(N_FFT, device=self.device)
        self.notes: list[str] = []
        # the audio path's own stream; None on the CPU
        self.stream = (
            torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        )
        # host side: each canvas's audio is written into one buffer (pinned on CUDA) and the
        # whole batch goes over in one asynchronous copy; the silence after each canvas's audio
        # is made on the device from its length (stale samples there are masked, never read)
        on_cuda = self.device.type == "cuda"
        self._host = torch.zeros(self.max_batch, CANVAS_SAMPLES, pin_memory=on_cuda)
        self._host_len = torch.zeros(self.max_batch, dtype=torch.int64, pin_memory=on_cuda)
        self._audio = self._host if not on_cuda else self._host.to(self.device)
        self._lengths = self._host_len if not on_cuda else self._host_len.to(self.device)
        self._positions = torch.arange(CANVAS_SAMPLES, device=self.device)  # [480000]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if cuda_graphs and self.device.type == "cuda":
            self._capture()

    def _forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        silence = self._positions >= lengths[:, None]  # [B, 480000]: after each canvas's audio
        audio = audio.masked_fill(silence, 0.0)
        mel = log_mel(audio, self.mel_filters, self.window)  # [B, 80, 3000]
        return whisper_hidden_states(self.model, mel.to(self.dtype))  # [B, 1500, 5, 384]

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)  # the buffers above are ready
        for b in self.buckets:
            x, lengths = self._audio[:b], self._lengths[:b]
            try:
                with torch.cuda.stream(self.stream), torch.inference_mode():
                    for _ in range(2):  # warm: cuFFT plans and kernels chosen before capture
                        self._forward(x, lengths)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                        out = self._forward(x, lengths)
                self._graphs[b] = (graph, out)
            except Exception as exc:  # eager for this bucket; say why
                self.notes.append(f"batch {b}: no CUDA graph ({type(exc).__name__}: {exc})")
        torch.cuda.synchronize(self.device)

    def bucket(self, n: int) -> int:
        """The smallest bucket holding ``n`` canvases."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} canvases in one call; at most {self.max_batch}")

    def __call__(self, canvases: list[np.ndarray]) -> torch.Tensor:
        """Hidden states of these canvases; each is audio from the start of a 30 s segment.

        More canvases than the largest bucket run as several calls.

        Returns:
            ``[len(canvases), 1500, 5, 384]`` float32 on the encoder's device (synchronised).
        """
        on_stream = torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()
        if len(canvases) > self.max_batch:
            m = self.max_batch
            parts = [self(canvases[i : i + m]) for i in range(0, len(canvases), m)]
            # the cat on the encoder's stream, waited for: on the caller's (the GPU worker's)
            # stream it could run after the caller reads the result on this one, and after the
            # parts' memory went back to this stream's pool for reuse
            with on_stream:
                out = torch.cat(parts)  # [n, 1500, 5, 384]
            if self.stream is not None:
                self.stream.synchronize()
            return out
        n = len(canvases)
        b = self.bucket(n)
        host, host_len = self._host.numpy(), self._host_len.numpy()
        host_len[:b] = 0  # padding canvases: all silence
        for i, c in enumerate(canvases):
            c = np.asarray(c, np.float32)[:CANVAS_SAMPLES]
            host[i, : len(c)] = c
            host_len[i] = len(c)
        with on_stream, torch.inference_mode():
            if self._audio is not self._host:  # one asynchronous copy for the whole batch
                self._audio[:b].copy_(self._host[:b], non_blocking=True)
                self._lengths[:b].copy_(self._host_len[:b], non_blocking=True)
            if b in self._graphs:
                graph, out = self._graphs[b]
                graph.replay()
            else:
                out = self._forward(self._audio[:b], self._lengths[:b])
            hidden = out[:n].float() if out.dtype != torch.float32 else out[:n].clone()
        if self.stream is not None:
            self.stream.synchronize()  # this stream only: never waits for the GPU worker
        return hidden

    def check(self, reference) -> float:
        """Largest relative error against the reference path on two random canvases.

        Args:
            reference: ``canvases -> [B, 1500, 5, 384]``, e.g. ``encode_canvases`` in fp32.
        """
        rng = np.random.default_rng(0)
        canvases = [(rng.standard_normal(SAMPLE_RATE * s) * 0.1).astype(np.float32) for s in (1, 7)]
        got, ref = self(canvases), reference(canvases).to(self.device)
        return float(((got - ref).norm() / ref.norm()).item())

    def describe(self) -> str:
        """One line: dtype, device, which buckets run as graphs."""
        dt = str(self.dtype).removeprefix("torch.")
        graphs = ", ".join(str(b) for b in self.buckets if b in self._graphs) or "none"
        return f"whisper canvases: {dt} on {self.device}, CUDA graphs for batches: {graphs}" + (
            f" ({'; '.join(self.notes)})" if self.notes else ""
        )
