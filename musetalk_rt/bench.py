"""Benchmarks: engine x dtype x batch scenarios of the GPU half (UNet + VAE decode).

Each scenario builds the engine for its buckets (build time reported apart), checks parity
against fp32 eager on fresh inputs, then times the steady state: CUDA events on the GPU,
``perf_counter`` on the CPU, median and p95 over many iterations. Rows are JSONL under
``experiments/results/<date>_<gpu>_<sha>/``; the command prints a table for people and ends
with one JSON line for scripts.

``p50_ms`` (and ``fps``) time one step from an idle GPU: the host's work before the first kernel
(casts, guards, graph launch) is inside it. ``gpu_p50_ms`` times the same step queued behind a
GPU sleep, so the host has issued it before the GPU reaches it: the GPU's own time. Their
difference is the launch latency a pipelined caller could hide — or, for long steps, not only
that: the sleep also lets a card that runs at its power limit cool for a moment, so each queued
step may run at higher clocks than back to back. ``sustained_ms_per_batch`` (CUDA) times many
steps back to back on one stream behind one sleep (the GPU never idles between steps): the
model half's own throughput under continuous load (a live worker adds the copy to the host and
the blend). ``host_issue_ms`` is the host's time to issue one such step, the quickest of the
queue: a few steps ahead the host waits for the GPU at each one (on an H200 the mean issue time
of a queue of captured steps came to 84–93% of the GPU's step), so the mean says nothing of the
host's own cost. ``sm_clock_mhz`` samples the SM clock (NVML, else
``nvidia-smi``; None without either) while such a queue runs — back to back, and each step
behind its own sleep as ``gpu_p50_ms`` runs them, with ``card_load`` (power draw and NVML's
clock limits: ``sw_power_cap`` or a thermal slowdown) — and with the GPU idle (NVML's reading lags
the load: right after a queue it still shows the busy clock), beside the card's maximum
(``nvidia-smi``). On an H200 at batch 32 the clock back to back was 1575 MHz of 1980 (its
power limit, most likely), and the sleep let it run the next step faster (1665 MHz).

``overlap_fps`` (CUDA, separate stages): the steady-state throughput when the UNet of batch n+1
runs on one CUDA stream beside the VAE decode of batch n on another, queued behind a GPU sleep;
``overlap_p50_ms`` is one batch's time from its UNet's start to its decode's end in that
pipeline. Small batches leave much of the card idle inside each kernel (the UNet's at batch 4
run at a third of the convolution rate of the VAE's), which a second stream can fill; the
latency of one batch is not shortened by it. ``overlap_exact`` says the overlapped decode gave
the same images as the sequential one. ``overlap_by_priority`` times the same pipeline with one
stage's graphs captured and replayed at a higher CUDA stream priority (``unet_high``,
``vae_high``): with equal priorities the UNet's short kernels queue behind the waves of the
VAE's long ones, and its chain, not the card, can set the pace. The re-captures allocate, so
``peak_mem_mb_before_priorities`` gives the row's peak before them (build, gate and timing).

``peak_mem_mb_by_phase`` holds the CUDA allocator's peak (MiB) in each phase of a row: the build
(all buckets, shared by the process's rows), the quality gate (the fp32 reference runs there)
and the timing. Each is a level, not an increment: what earlier phases left allocated counts.
``peak_mem_mb`` is the highest of the three (a process's earlier batch sizes are not in it).
Some batch-32 rows on an H100 recorded 41.3 GiB where others of the same configuration recorded
19.6, already before the priority passes; the phases say which part it is.

``fuse_stages``: UNet and VAE decode built as one module (one graph, one replay per step); the
row then has no per-stage times. ``GpuTurns``: several bench processes on one GPU build at the
same time and take turns for the timing, each after all have built (or a deadline passed).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

import musetalk_rt
from musetalk_rt.engines import parse_dtype, select_engine
from musetalk_rt.engines.parity import check_parity
from musetalk_rt.errors import UserError
from musetalk_rt.modeling import UNetStep, VaeDecodeStep
from musetalk_rt.stages import UNetStage, VaeDecodeStage, reference_stages
from musetalk_rt.weights import Models

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_state(root: Path = REPO_ROOT) -> tuple[str, bool]:
    """``(short sha, dirty)`` of the checkout, or ``("nogit", False)``.

    ``MUSETALK_RT_GIT_SHA`` overrides it, for copies of a checkout that carry no ``.git``.
    """
    if os.environ.get("MUSETALK_RT_GIT_SHA"):
        return os.environ["MUSETALK_RT_GIT_SHA"], False
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "nogit", False


def environment(device: torch.device) -> dict:
    """Hardware and software facts every row carries."""
    import diffusers

    env = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "musetalk_rt": musetalk_rt.__version__,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        driver = _smi(device, ["driver_version"], timeout_s=10)
        env["driver"] = driver[0] if driver else "unknown"
    else:
        env["gpu"] = f"cpu ({platform.processor() or platform.machine()})"
        env["driver"] = None
    sha, dirty = git_state()
    env["git_sha"], env["git_dirty"] = sha, dirty
    return env


def results_dir(base: Path, env: dict) -> Path:
    """``<base>/<date>_<gpu>_<sha>/``."""
    gpu = "".join(c if c.isalnum() else "-" for c in env["gpu"].lower()).strip("-")
    while "--" in gpu:
        gpu = gpu.replace("--", "-")
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    return base / f"{date}_{gpu[:40]}_{env['git_sha']}{'-dirty' if env['git_dirty'] else ''}"


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# the overlapped stages again with one stage's kernels first (CUDA stream priorities: a block
# of the higher stream is scheduled before waiting blocks of the lower): (UNet, VAE) priority
OVERLAP_PRIORITIES = {"unet_high": (-1, 0), "vae_high": (0, -1)}
GPU_SLEEP_CYCLES = 10_000_000  # ~5 ms at H100 clocks: longer than any step's host-side issue


def _timing_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def _time_step(
    step: Callable[[], None],
    device: torch.device,
    warmup: int,
    iters: int,
    gpu_bound: bool = False,
) -> list[float]:
    """Milliseconds per ``step``; ``gpu_bound`` queues a GPU sleep first (CUDA only)."""
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = _timing_event(), _timing_event()
            if gpu_bound:
                torch.cuda._sleep(GPU_SLEEP_CYCLES)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _time_queued(
    step: Callable[[], None], device: torch.device, iters: int, sleep_each: bool = False
) -> tuple[list[float], float, float, dict]:
    """``iters`` steps queued on one stream behind a GPU sleep (CUDA), the card read meanwhile.

    Args:
        step: One step.
        device: The CUDA device.
        iters: Steps queued.
        sleep_each: Each step behind its own sleep (as ``gpu_p50_ms`` runs them), else back
            to back behind one.

    Returns:
        ``(step_ms, span_ms_per_step, host_issue_ms, card)``: each step's
        milliseconds, and the span from the first step's start to the last one's end over
        ``iters`` (back to back: the steady-state time per step). ``host_issue_ms`` is the
        quickest step's issue on the host: once it is a few steps ahead, the host waits for the
        GPU at each step, so the quickest is the host's own cost. ``card`` is its SM clock
        (``sm_clock_mhz``), power draw and clock limits (:func:`_load_state`), read after the
        host has queued every step, while the GPU works through them.
    """
    marks = [(_timing_event(), _timing_event()) for _ in range(iters)]
    issue_ms = []
    torch.cuda.synchronize(device)
    torch.cuda._sleep(GPU_SLEEP_CYCLES)  # the host queues ahead of the GPU
    for start, end in marks:
        if sleep_each:
            torch.cuda._sleep(GPU_SLEEP_CYCLES)
        t0 = time.perf_counter()
        start.record()
        step()
        end.record()
        issue_ms.append((time.perf_counter() - t0) * 1000.0)
    host_ms = min(issue_ms)
    card = {"sm_clock_mhz": _sm_clock_mhz(device), **_load_state(device)}
    marks[-1][1].synchronize()
    span_ms = marks[0][0].elapsed_time(marks[-1][1]) / iters
    return [a.elapsed_time(b) for a, b in marks], span_ms, host_ms, card


def _host_index(device: torch.device) -> int:
    """The card's index among the host's (what NVML and ``nvidia-smi`` count)."""
    index = device.index if device.index is not None else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    if index < len(visible) and visible[index].isdigit():
        index = int(visible[index])  # the host's card behind visible device ``index``
    return index


def _smi(device: torch.device, fields: list[str], timeout_s: float = 5) -> list[str] | None:
    """One ``nvidia-smi`` query of ``fields`` for the device's card; None without the tool."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    cmd = [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(
            [*cmd, "-i", str(_host_index(device))],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return values if len(values) == len(fields) else None


def _sm_clock_mhz(device: torch.device, maximum: bool = False) -> int | None:
    """The card's SM clock now (MHz): NVML through torch, else ``nvidia-smi``; None without.

    ``maximum``: the card's highest SM clock instead (``nvidia-smi`` only), what "now" is read
    against — a busy card below it is held back by its power or heat limit.
    """
    if not maximum:
        try:
            return int(torch.cuda.clock_rate(device))
        except Exception:  # torch reads NVML through the optional pynvml: try the tool instead
            pass
    values = _smi(device, ["clocks.max.sm" if maximum else "clocks.sm"])
    try:
        return int(values[0]) if values else None
    except ValueError:  # "[N/A]"
        return None


# NVML's clock event ("throttle") reasons, by bit
CLOCK_LIMITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def _load_state(device: torch.device) -> dict:
    """The card's power draw (W) and why its clock is held down now: NVML, else ``nvidia-smi``.

    Read while a queue runs, it tells a power limit (``sw_power_cap``) from a heat one
    (``*_thermal_slowdown``). Empty without either source.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(_host_index(device))
        power_w = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW
        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        mask = int((reasons or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)(handle))
    except Exception:  # no pynvml, or no NVML: the tool
        values = _smi(device, ["power.draw", "clocks_event_reasons.active"])
        try:
            power_w, mask = float(values[0]), int(values[1], 16)
        except (TypeError, ValueError):
            return {}
    limits = [name for bit, name in CLOCK_LIMITS.items() if mask & bit]
    return {"power_w": round(power_w, 1), "clock_limits": limits or ["none"]}


def _measure(
    unet, vae, batch: int, device: torch.device, warmup: int, iters: int, fused=None
) -> tuple[dict[str, list[float]], list[float], list[float] | None, dict]:
    """Time the UNet alone, the VAE decode alone, both chained, and the chain GPU-bound (ms).

    With ``fused`` (a runner of both stages as one module), only the chain is timed. The last
    item is the CUDA-only figures: the sustained chain, the SM clocks and, with separate stages,
    the overlapped stages (empty on other devices).
    """
    g = torch.Generator().manual_seed(batch)
    latents = torch.randn(batch, 8, 32, 32, generator=g).to(device)  # [B, 8, 32, 32]
    audio = torch.randn(batch, 50, 384, generator=g).to(device)  # [B, 50, 384]
    with torch.inference_mode():
        if fused is not None:
            per_stage = {}

            def chain():
                return fused(latents, audio)

        else:
            pred = unet.run(latents, audio).clone()  # [B, 4, 32, 32]
            per_stage = {
                "unet": _time_step(lambda: unet.run(latents, audio), device, warmup, iters),
                "vae_decode": _time_step(lambda: vae.run(pred), device, warmup, iters),
            }

            def chain():
                return vae.run(unet.run(latents, audio))

        total = _time_step(chain, device, warmup, iters)
        gpu, overlap = None, {}
        if device.type == "cuda":
            # the GPU's own time of one step: each behind a sleep, so the host is ahead of it
            gpu, _, _, card_each = _time_queued(chain, device, iters, sleep_each=True)
            _, sustained_ms, host_ms, card_on = _time_queued(chain, device, max(iters, 20))
            clocks = {
                "back_to_back": card_on.pop("sm_clock_mhz"),
                "each_behind_a_sleep": card_each.pop("sm_clock_mhz"),
                "idle": _sm_clock_mhz(device),
                "max": _sm_clock_mhz(device, maximum=True),
            }
            overlap = {
                "sustained_ms_per_batch": round(sustained_ms, 3),
                "sustained_fps": round(batch * 1000.0 / sustained_ms, 1),
                "host_issue_ms": round(host_ms, 3),
                "sm_clock_mhz": clocks,
                # power draw (W) and clock limits under each load: power- or heat-limited?
                "card_load": {"back_to_back": card_on, "each_behind_a_sleep": card_each},
            }
        if device.type == "cuda" and fused is None:
            figures = _overlap_figures(
                batch, *_time_overlapped(unet, vae, latents, audio, device, max(iters, 20))
            )
            overlap |= {f"overlap_{k}": v for k, v in figures.items()}
            # the timing's peak so far, before the priority passes' re-captures (run_bench adds
            # the build's and the gate's)
            overlap["peak_mem_mb_before_priorities"] = round(
                torch.cuda.max_memory_allocated(device) / 2**20
            )
            by_priority = _time_priorities(unet, vae, latents, audio, device, max(iters, 20))
            if by_priority:
                overlap["overlap_by_priority"] = by_priority
    return per_stage, total, gpu, overlap


def _time_priorities(
    unet, vae, latents: torch.Tensor, audio: torch.Tensor, device: torch.device, iters: int
) -> dict[str, dict]:
    """The overlapped stages again with each stage of ``OVERLAP_PRIORITIES`` first (CUDA).

    A graph runs at the priority of the stream it was captured on, so the high stage's graph
    for this batch is re-captured at that priority, and both are back at 0 afterwards, even
    after an error. A variant whose high stage has no graph of this project's capture is left
    out (its priority could not apply).

    Returns:
        Variant name -> ``ms_per_batch``, ``fps``, ``p50_ms`` (a batch's start to its faces)
        and ``exact`` (the images equal the sequential ones).
    """
    batch = latents.shape[0]
    by_priority = {}
    try:
        for name, (p_unet, p_vae) in OVERLAP_PRIORITIES.items():
            unet_graphs = unet.runner.capture_priority(p_unet, batch)
            vae_graphs = vae.runner.capture_priority(p_vae, batch)
            if (p_unet and not unet_graphs) or (p_vae and not vae_graphs):
                continue  # the high stage's priority could not apply
            by_priority[name] = _overlap_figures(
                batch,
                *_time_overlapped(unet, vae, latents, audio, device, iters, (p_unet, p_vae)),
            )
    finally:
        unet.runner.capture_priority(0, batch)
        vae.runner.capture_priority(0, batch)
    return by_priority


def _overlap_figures(batch: int, ms_per_batch: float, latencies: list[float], exact: bool) -> dict:
    """One overlapped pipeline's figures (:func:`_time_overlapped`'s result), rounded."""
    return {
        "ms_per_batch": round(ms_per_batch, 3),
        "fps": round(batch * 1000.0 / ms_per_batch, 1),
        "p50_ms": round(statistics.median(latencies), 3),
        "exact": exact,
    }


def _time_overlapped(
    unet,
    vae,
    latents: torch.Tensor,
    audio: torch.Tensor,
    device: torch.device,
    iters: int,
    priorities: tuple[int, int] = (0, 0),
) -> tuple[float, list[float], bool]:
    """UNet of batch n+1 on one stream beside the VAE decode of batch n on another (CUDA).

    ``priorities`` are the two streams' (UNet, VAE; lower is higher). A graph replayed on them
    keeps the priority it was captured at (:meth:`Runner.capture_priority`).

    Returns:
        ``(ms_per_batch, latencies_ms, exact)``: the steady-state milliseconds per batch over
        ``iters`` batches queued behind a GPU sleep, each batch's UNet-start to decode-end
        milliseconds, and whether the last overlapped decode equals a sequential one bitwise.
    """
    cur = torch.cuda.current_stream(device)
    s_unet = torch.cuda.Stream(device, priority=priorities[0])
    s_vae = torch.cuda.Stream(device, priority=priorities[1])

    ev = _timing_event

    def pipeline(n: int) -> tuple[float, list[float], torch.Tensor]:
        starts, ends, images = [ev() for _ in range(n)], [ev() for _ in range(n)], None
        begin, finish = ev(), ev()
        torch.cuda.synchronize(device)
        torch.cuda._sleep(GPU_SLEEP_CYCLES)  # the host queues ahead of the GPU
        begin.record(cur)
        s_unet.wait_stream(cur)
        s_vae.wait_stream(cur)
        for i in range(n):
            with torch.cuda.stream(s_unet):
                starts[i].record(s_unet)
                pred = unet.run(latents, audio)  # [B, 4, 32, 32], allocated on s_unet
                ready = torch.cuda.Event()
                ready.record(s_unet)
            with torch.cuda.stream(s_vae):
                s_vae.wait_event(ready)
                pred.record_stream(s_vae)  # freed by s_unet's pool only after the decode
                images = vae.run(pred)
                ends[i].record(s_vae)
        cur.wait_stream(s_unet)
        cur.wait_stream(s_vae)
        finish.record(cur)
        finish.synchronize()
        lat = [a.elapsed_time(b) for a, b in zip(starts, ends, strict=True)]
        return begin.elapsed_time(finish) / n, lat, images

    pipeline(3)  # warm the streams' allocator pools
    ms_per_batch, latencies, images = pipeline(iters)
    reference = vae.run(unet.run(latents, audio))
    torch.cuda.synchronize(device)
    return ms_per_batch, latencies, bool(torch.equal(images, reference))


class _PhasePeaks:
    """The CUDA allocator's peak memory (MiB) per bench phase; records nothing off CUDA.

    The first phase starts when the object is made.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: dict[str, int] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def end(self, phase: str) -> None:
        """Record the peak since the last phase ended as ``phase``'s, and start a new one."""
        if self.device.type == "cuda":
            self.mb[phase] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
            torch.cuda.reset_peak_memory_stats(self.device)

    def overall(self, *phases: str) -> int | None:
        """The highest of ``phases``' peaks (all recorded phases without any); None off CUDA."""
        picked = [self.mb[p] for p in phases or self.mb if p in self.mb]
        return max(picked) if picked else None


class _FusedStep(torch.nn.Module):
    """UNet step then VAE decode as one module: ``(latents, audio) -> (pred_latents, images)``."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module):
        super().__init__()
        self.unet = UNetStep(unet)
        self.decode = VaeDecodeStep(vae)

    def forward(self, latents: torch.Tensor, audio: torch.Tensor):
        pred = self.unet(latents, audio)
        return pred, self.decode(pred)


def _fused_parity_runners(fused):
    """``(unet, vae)`` callables for ``check_parity`` from one fused runner (same call)."""
    last = {}

    def unet(latents, audio):
        last["pred"], last["images"] = fused(latents, audio)
        return last["pred"]

    def vae(pred):
        return last["images"]

    return unet, vae


@contextlib.contextmanager
def building(turns: GpuTurns | None, log: Callable[[str], None] = print):
    """Around a build that shares the GPU with ``turns`` (nothing without them).

    A build that fails marks this process ready, so that its peers need not wait for it until
    the deadline; one that finishes waits for its peers' builds (:meth:`GpuTurns.wait`).
    """
    try:
        yield
    except BaseException:
        if turns is not None:
            turns.mark_ready()
        raise
    if turns is not None:
        turns.wait(log)


class GpuTurns:
    """Concurrent bench processes on one GPU: build together, time one at a time.

    Each process marks itself ready in ``folder`` once built (or failed), waits until ``peers``
    are ready or ``deadline_s`` after its start have passed, then times under an exclusive
    file lock. Each process also caps its GPU memory at ``0.9 / peers`` of the card (at least
    15%: a B=4 build of UNet + VAE peaks near 7 GB of 80) so that concurrent builds, and cuDNN's
    autotuning workspaces above all, cannot starve each other. While the process holds the lock
    and every peer has marked itself ready (built or failed, so none is building), the cap is
    lifted: a B32 gate and timing need ~20 GiB, more than the cap of five peers (14.25 GiB of
    79). After the turn the process hands its cached blocks back and is capped again.
    """

    def __init__(self, folder: Path, peers: int, deadline_s: float = 420.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.peers = peers
        self.deadline = time.monotonic() + deadline_s
        self.ready_peers: int | None = None
        self._marked = False
        self._capped: tuple[float, int] | None = None  # (fraction, CUDA index) once capped

    def limit_memory(self, device: torch.device) -> None:
        """Cap this process's share of the GPU's memory while its peers build."""
        if device.type == "cuda" and self.peers > 1:
            index = device.index if device.index is not None else torch.cuda.current_device()
            fraction = max(0.9 / self.peers, 0.15)
            torch.cuda.set_per_process_memory_fraction(fraction, index)
            self._capped = (fraction, index)

    def _count(self) -> int:
        return len(list(self.folder.glob("ready.*")))

    def mark_ready(self) -> None:
        if not self._marked:
            (self.folder / f"ready.{os.getpid()}").touch()
            self._marked = True

    def wait(self, log: Callable[[str], None] = print) -> None:
        """Mark ready and wait for the peers (once; later calls return at once)."""
        if self.ready_peers is not None:
            return
        self.mark_ready()
        while self._count() < self.peers and time.monotonic() < self.deadline:
            time.sleep(1.0)
        self.ready_peers = self._count()
        log(f"gpu turns: {self.ready_peers}/{self.peers} peers ready")

    def turn(self):
        """Context manager: the exclusive lock for timing (the cap lifted when no peer builds)."""
        turns = self

        class _Lock:
            def __enter__(self):
                self.f = (turns.folder / "lock").open("w")
                fcntl.flock(self.f, fcntl.LOCK_EX)
                # a peer past the deadline may still be building under its own cap
                self.lifted = turns._capped is not None and turns._count() >= turns.peers
                if self.lifted:
                    torch.cuda.set_per_process_memory_fraction(1.0, turns._capped[1])

            def __exit__(self, *exc):
                try:
                    if self.lifted:  # the next process's turn, or a later build here, needs it
                        index = turns._capped[1]
                        torch.cuda.synchronize(index)
                        torch.cuda.empty_cache()
                        torch.cuda.set_per_process_memory_fraction(*turns._capped)
                finally:
                    fcntl.flock(self.f, fcntl.LOCK_UN)
                    self.f.close()

        return _Lock()

    def as_dict(self) -> dict:
        return {"peers": self.peers, "ready_peers": self.ready_peers}


def run_bench(
    models: Models,
    engines: list[str],
    dtypes: list[str],
    batch_sizes: list[int],
    warmup: int = 3,
    iters: int = 20,
    engine_options: dict | None = None,
    log: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    cache_root: Path | None = None,
    fuse_stages: bool = False,
    turns: GpuTurns | None = None,
    on_built: Callable[[str, str, Callable, Callable], None] | None = None,
) -> list[dict]:
    """Run every engine x dtype x batch scenario; return one row per scenario.

    Args:
        models: Reference models (fp32) on the benchmark device.
        engines: Engine names.
        dtypes: Dtype names.
        batch_sizes: Batch sizes (each one a bucket).
        warmup: Untimed iterations after the build.
        iters: Timed iterations.
        engine_options: Per-engine constructor options, ``{"compile": {"backend": …}}``.
        log: Progress lines.
        on_row: Called with each row as soon as it is measured (so a crash keeps the rows).
        cache_root: ``models_dir`` whose engine cache primes builds (build_s then shows it).
        fuse_stages: Build UNet + VAE decode as one module (no engine cache, no per-stage times).
        turns: Share the GPU with concurrent bench processes (see :class:`GpuTurns`).
        on_built: Called as ``on_built(engine, dtype, unet_run, vae_run)`` once an engine is
            built and measured, before it is freed (the workbench compares its faces).
    """
    device = models.device
    env = environment(device)
    if turns is not None:
        turns.limit_memory(device)
    ref_unet, ref_vae = reference_stages(models, batch_sizes)
    rows = []
    for engine_name in engines:
        for dtype_name in dtypes:
            dtype = parse_dtype(dtype_name)
            opts = (engine_options or {}).get(engine_name, {})
            engine, reason = select_engine(engine_name, device, dtype, fix_hint="", **opts)
            if fuse_stages and getattr(engine, "autotune_stages", ()):
                raise UserError(
                    "--fuse-stages builds UNet and VAE decode as one module; --autotune-stages "
                    "needs them apart (drop one of the two)"
                )
            unet = UNetStage(models.unet, engine, dtype, device)
            vae = VaeDecodeStage(models.vae, engine, dtype, device)
            log(f"building {engine_name}/{dtype_name} for batches {batch_sizes} …")
            peaks = _PhasePeaks(device)
            fused = None
            with building(turns, log):
                if fuse_stages:
                    fused = engine.build(
                        _FusedStep(models.unet, models.vae),
                        unet.example_inputs,
                        batch_sizes,
                        dtype,
                        device,
                    )
                    rep_u = rep_v = fused.report
                    parity_u, parity_v = _fused_parity_runners(fused)
                else:
                    # a line per stage: a build that stalls says where (a log that stops at
                    # "building" told nothing when six B4 builds at once ran past their limit)
                    rep_u = unet.prepare(batch_sizes, cache_root, models.fingerprint)
                    log(f"unet built in {sum(rep_u.build_s.values()):.1f} s")
                    rep_v = vae.prepare(batch_sizes, cache_root, models.fingerprint)
                    log(f"vae_decode built in {sum(rep_v.build_s.values()):.1f} s")
                    parity_u, parity_v = unet.run, vae.run
                peaks.end("build")
            for b in batch_sizes:
                with turns.turn() if turns is not None else _no_lock():
                    quality = check_parity(ref_unet.run, ref_vae.run, parity_u, parity_v, b, device)
                    peaks.end("gate")
                    per_stage, total, gpu, overlap = _measure(
                        unet, vae, b, device, warmup, iters, fused
                    )
                    peaks.end("timing")
                if "peak_mem_mb_before_priorities" in overlap:  # the timing's so far: add the rest
                    overlap["peak_mem_mb_before_priorities"] = max(
                        overlap["peak_mem_mb_before_priorities"], peaks.overall("build", "gate")
                    )
                p50 = statistics.median(total)
                build_s = (
                    rep_u.build_s.get(b, 0.0)
                    if fuse_stages
                    else rep_u.build_s.get(b, 0.0) + rep_v.build_s.get(b, 0.0)
                )
                row = {
                    "scenario": f"{engine_name}-{dtype_name}-b{b}",
                    "stages": "unet+vae_decode (fused)" if fuse_stages else "unet+vae_decode",
                    "engine": engine_name,
                    "engine_reason": f"{reason}; {rep_u.reason}",
                    "dtype": dtype_name,
                    "batch": b,
                    "p50_ms": round(p50, 3),
                    "p95_ms": round(_percentile(total, 0.95), 3),
                    "fps": round(b * 1000.0 / p50, 1),
                    "gpu_p50_ms": round(statistics.median(gpu), 3) if gpu else None,
                    "gpu_fps": round(b * 1000.0 / statistics.median(gpu), 1) if gpu else None,
                    **overlap,
                    "unet_p50_ms": _p50(per_stage.get("unet")),
                    "vae_decode_p50_ms": _p50(per_stage.get("vae_decode")),
                    "peak_mem_mb": peaks.overall(),
                    "peak_mem_mb_by_phase": dict(peaks.mb) or None,
                    "build_s": round(build_s, 2),
                    "engine_cache": rep_u.cache,
                    "engine_options": engine.row_options(device),
                    "quality": quality.as_dict(),
                    "weights": models.kind,
                    "weights_fingerprint": models.fingerprint,
                    "iters": iters,
                    "device": str(device),
                    **({"gpu_turns": turns.as_dict()} if turns is not None else {}),
                    **env,
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                }
                rows.append(row)
                if on_row:
                    on_row(row)
                both = (
                    f", sustained {overlap['sustained_fps']} fps"
                    if "sustained_fps" in overlap
                    else ""
                ) + (
                    f", stages overlapped {overlap['overlap_fps']} fps"
                    if "overlap_fps" in overlap
                    else ""
                )
                both += "".join(
                    f", {name} {v['fps']} fps"
                    for name, v in overlap.get("overlap_by_priority", {}).items()
                )
                clock = overlap.get("sm_clock_mhz", {}).get("back_to_back")
                if clock:  # below the card's maximum: power- or heat-limited (README)
                    both += f", SM clock {clock} MHz back to back"
                log(
                    f"  {row['scenario']}: {row['p50_ms']} ms, {row['fps']} fps{both}, "
                    f"PSNR {quality.psnr_db} dB"
                )
            if on_built is not None:
                on_built(engine_name, dtype_name, parity_u, parity_v)
            unet = vae = fused = parity_u = parity_v = None  # free this engine's copies
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


class _no_lock:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _p50(times: list[float] | None) -> float | None:
    return round(statistics.median(times), 3) if times else None


def write_rows(rows: list[dict], out_dir: Path, name: str = "bench.jsonl") -> Path:
    """Append rows as JSON lines to ``out_dir/name``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def table(rows: list[dict]) -> str:
    """A human-readable table of bench rows.

    ``gpu ms`` is the GPU-bound step, ``sust ms`` the step back to back and ``MHz`` the SM clock
    meanwhile (CUDA; see the module docstring).
    """
    head = (
        f"{'scenario':<24}{'p50 ms':>9}{'p95 ms':>9}{'fps':>8}{'gpu ms':>8}{'sust ms':>8}"
        f"{'MHz':>6}{'unet':>8}{'vae':>8}{'build s':>9}{'PSNR dB':>9}{'lat err':>10}{'mem MB':>8}"
    )

    def ms(v) -> str:
        return f"{v:>8.2f}" if v is not None else f"{'-':>8}"

    lines = [head, "-" * len(head)]
    for r in rows:
        q = r["quality"]
        mhz = (r.get("sm_clock_mhz") or {}).get("back_to_back")  # the clock under load
        lines.append(
            f"{r['scenario']:<24}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['fps']:>8.1f}"
            f"{ms(r.get('gpu_p50_ms'))}{ms(r.get('sustained_ms_per_batch'))}"
            f"{mhz if mhz else '-':>6}{ms(r['unet_p50_ms'])}{ms(r['vae_decode_p50_ms'])}"
            f"{r['build_s']:>9.1f}"
            f"{q['psnr_db']:>9.2f}{q['latent_rel_err']:>10.2e}{r['peak_mem_mb'] or 0:>8}"
        )
    if rows:
        r = rows[0]
        lines.append(
            f"device {r['gpu']}, torch {r['torch']}, weights {r['weights']} "
            f"(random: speed only), git {r['git_sha']}{'+dirty' if r['git_dirty'] else ''}"
        )
    return "\n".join(lines)
