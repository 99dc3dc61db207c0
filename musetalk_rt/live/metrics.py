"""Prometheus text exposition of the live process (``GET /metrics`` on the ingest port)."""

from __future__ import annotations


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def metrics_text(
    channels: list,
    worker,
    speech: list | tuple = (),
    wake=None,
    gc_watch=None,
    host_load=None,
    disks=None,
) -> str:
    """Counters and gauges of every channel, output, the GPU worker and the Groq speech path.

    ``wake``: the process's :class:`~.wakeprobe.WakeProbe` (thread wake-up delay), if any.
    ``gc_watch``: its :class:`~.gcwatch.GcWatch` (garbage-collection pauses), if any.
    ``host_load``: its :class:`~.hostload.HostLoad` (the host's CPU over the last second), if
    any; nothing is shown before its first sample or where ``/proc`` is missing.
    ``disks``: the recordings' :class:`~.diskwatch.RecordingDisks`, if any.
    """
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        out.append(f"# HELP musetalk_{name} {help_text}")
        out.append(f"# TYPE musetalk_{name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            out.append(f"musetalk_{name}{{{lab}}} {value}")

    st = [(ch, ch.stats.as_dict()) for ch in channels]
    for key, kind, text in (
        ("frames_out", "counter", "frames emitted by the channel clock"),
        ("speech_frames", "counter", "generated (talking) frames shown"),
        ("late_frames", "counter", "speech frames not ready at their deadline (idle shown)"),
        ("shed_frames", "counter", "of the late frames, those the GPU worker skipped (no time)"),
        ("skipped_frames", "counter", "frames skipped after the clock fell behind by > 1 s"),
        ("dropped_audio_chunks", "counter", "ingest chunks dropped on a full audio queue"),
        ("sessions", "counter", "sender sessions"),
        ("late_windows", "counter", "audio windows that came after their frame was shown"),
        ("skipped_windows", "counter", "windows not computed: their frame was shown before"),
        ("audio_errors", "counter", "failed voice-activity or feature calls (logged, survived)"),
        ("clock_errors", "counter", "frames the clock failed to make (idle sent instead)"),
        ("output_errors", "counter", "frames an output refused with an error (logged)"),
        ("clock_shifts", "counter", "timelines moved in a pause for a sender's drifting clock"),
    ):
        metric(f"{key}_total", kind, text, [({"channel": ch.name}, s[key]) for ch, s in st])
    metric(
        "clock_shift_frames",
        "gauge",
        "by how many frames the channel's timelines were moved in all (positive: later, the "
        "sender's clock slower than this host's)",
        [({"channel": ch.name}, s["clock_shift_frames"]) for ch, s in st],
    )
    metric(
        "voice_to_frame_p95_ms",
        "gauge",
        "input audio arrival to frame emission, p95",
        [({"channel": ch.name}, s["voice_to_frame_p95_ms"] or 0) for ch, s in st],
    )
    metric(
        "window_lead_p05_ms",
        "gauge",
        "time from an audio window's arrival to its frame's deadline, 5th percentile "
        "(the slack for the GPU batch and the blend; near 0 = the audio path lags)",
        [({"channel": ch.name}, s["window_lead_p05_ms"] or 0) for ch, s in st],
    )
    metric(
        "playout_delay_ms",
        "gauge",
        "the constant playout delay D",
        [({"channel": ch.name}, round(ch.delay_s * 1000)) for ch in channels],
    )
    metric(
        "audio_queue_depth",
        "gauge",
        "ingest chunks waiting for the feature thread",
        [({"channel": ch.name}, ch.audio_q.qsize()) for ch in channels],
    )
    outs = [(ch, o) for ch in channels for o in ch.outputs]
    for key, text in (
        ("written", "frames written"),
        ("dropped_full", "dropped: queue full"),
        ("dropped_down", "dropped: output down"),
        ("reconnects", "reconnects"),
        ("errors", "open or write errors"),
        ("stalls", "encoder processes killed for sending or writing nothing (a stuck server)"),
    ):
        metric(
            f"output_{key}_total",
            "counter",
            text,
            # (stalls: process outputs only; a thread output has no watchdog)
            [({"channel": ch.name, "output": o.label}, o.stats.get(key, 0)) for ch, o in outs],
        )
    metric(
        "output_up",
        "gauge",
        "1 while the output is open",
        [({"channel": ch.name, "output": o.label}, int(o.up)) for ch, o in outs],
    )
    metric(
        "output_queue_depth",
        "gauge",
        "frames waiting for the output's encoder",
        [({"channel": ch.name, "output": o.label}, o.depth()) for ch, o in outs],
    )
    metric("gpu_batches_total", "counter", "GPU worker batches", [({}, worker.batches)])
    metric(
        "gpu_frames_total", "counter", "frames generated by the GPU worker", [({}, worker.frames)]
    )
    metric(
        "gpu_busy_seconds_total",
        "counter",
        "the GPU worker's batches' time on the GPU (CUDA events, an upper bound; per wall second: "
        "how busy)",
        [({}, round(worker.gpu_busy_s, 3))],
    )
    metric(
        "blend_pending",
        "gauge",
        "frames taken by the GPU worker and not yet blended (blends wait for at most 4 batches)",
        [({"channel": ch.name}, len(ch.pending)) for ch in channels],
    )
    metric("blend_errors_total", "counter", "blends that failed", [({}, worker.blend_errors)])
    metric(
        "gpu_batch_errors_total",
        "counter",
        "GPU batches that failed (their frames showed idle)",
        [({}, worker.batch_errors)],
    )
    for name, key, text in (
        ("overlapped_batches", "overlapped", "batches launched while the last was still running"),
        ("idle_seconds", "idle_s", "seconds the GPU worker had nothing due"),
        ("blend_wait_seconds", "blend_wait_s", "seconds it waited for the blend threads"),
        ("fill_wait_seconds", "fill_wait_s", "seconds a partial batch waited for more frames"),
        ("shed_frames", "shed_frames", "late frames it had skipped: no time left before them"),
    ):
        metric(f"gpu_worker_{name}_total", "counter", text, [({}, round(getattr(worker, key), 3))])
    wait_s = worker.frame_wait_s()
    metric(
        "gpu_worker_frame_wait_ms",
        "gauge",
        "two median batches (launch to faces) and a blend: the longest a frame may wait from "
        "its audio window to its face; a window lead below it makes frames late (0: no batch yet)",
        [({}, round(wait_s * 1000.0, 1) if wait_s is not None else 0)],
    )
    metric(
        "stage_ms_total",
        "counter",
        "time per stage in the GPU worker",
        [({"stage": k}, round(v, 1)) for k, v in worker.clock.totals_ms(wait=False).items()],
    )
    if wake is not None:
        w = wake.summary()
        metric(
            "thread_wake_delay_ms",
            "gauge",
            "how much later than asked a sleeping Python thread runs again (interpreter lock "
            "and core contention; every thread pays it after each GPU wait or queue)",
            [({"quantile": "0.5"}, w["p50_ms"] or 0), ({"quantile": "0.99"}, w["p99_ms"] or 0)],
        )
    if gc_watch is not None:
        gens = range(3)
        metric(
            "gc_collections_total",
            "counter",
            "Python garbage collections, per generation (2 = full)",
            [({"generation": g}, gc_watch.collections[g]) for g in gens],
        )
        metric(
            "gc_pause_ms_max",
            "gauge",
            "the longest garbage collection so far, per generation (every thread stops for it)",
            [({"generation": g}, round(gc_watch.pause_ms_max[g], 3)) for g in gens],
        )
        metric(
            "gc_frozen_objects",
            "gauge",
            "objects frozen after start-up (never walked by a collection)",
            [({}, gc_watch.summary()["frozen_objects"])],
        )
    last = host_load.last if host_load is not None else None
    if last is not None:
        metric(
            "host_cpu_ratio",
            "gauge",
            "share of all the host's cores over the last second: busy (steal included), "
            "iowait, steal (taken by the hypervisor for another tenant)",
            [({"state": k}, last[k]) for k in ("busy", "iowait", "steal")],
        )
        metric(
            "cpu_cores",
            "gauge",
            "CPU used over the last second, in cores: this process (every thread) and its "
            "encoder child processes",
            [({"who": "process"}, last["process_cores"]),
             ({"who": "encoders"}, last["encoder_cores"])],
        )  # fmt: skip
    if disks is not None and disks.last:
        dd = disks.last  # sampled on the watch's thread: a hung mount never stalls this
        metric(
            "record_disk_free_bytes",
            "gauge",
            "free space on a recording folder's disk",
            [({"folder": d["folder"]}, d["free_bytes"]) for d in dd],
        )
        metric(
            "record_disk_seconds_left",
            "gauge",
            "time until that disk is full at the rate its free space fell over the last 5 "
            "minutes (shown once known and while it falls)",
            [
                ({"folder": d["folder"]}, round(d["left_s"], 1))
                for d in dd
                if d["left_s"] is not None
            ],
        )
    sp = [(x, x.stats_dict()) for x in speech]
    for key, text in (
        ("utterances", "utterances cut from the input"),
        ("captions", "captions published"),
        ("spoken", "voice mode: utterances spoken by Groq's text-to-speech"),
        ("fallbacks", "voice mode: utterances played in the MC's own voice"),
        ("failures", "utterances whose Groq calls failed within the budget"),
        ("dropped_utterances", "utterances dropped on a full queue"),
        ("skipped_behind", "voice mode: utterances skipped while the speech ran too far behind"),
        ("skipped_stale", "captions: utterances too old for a caption when Groq got to them"),
        ("breaker_opens", "times the Groq circuit opened"),
    ):
        metric(
            f"groq_{key}_total",
            "counter",
            text,
            [({"channel": x.channel.name}, d[key]) for x, d in sp],
        )
    metric(
        "groq_passthrough_seconds_total",
        "counter",
        "voice mode: seconds of the MC's live voice sent while Groq was failing",
        [({"channel": x.channel.name}, round(d["passthrough_s"], 2)) for x, d in sp],
    )
    metric(
        "groq_up",
        "gauge",
        "1 while the Groq circuit is closed (0 open, 0.5 trying again)",
        [
            (
                {"channel": x.channel.name},
                {"closed": 1, "half-open": 0.5}.get(d["breaker_state"], 0),
            )
            for x, d in sp
        ],
    )
    metric(
        "groq_utterance_to_speech_p95_ms",
        "gauge",
        "voice mode: end of an utterance to its synthesized speech on the output clock, p95",
        [({"channel": x.channel.name}, d["utterance_to_speech_ms"]["p95"] or 0) for x, d in sp],
    )
    calls: dict[tuple[str, str], int] = {}
    for _, d in sp:
        for what, n in d["calls"].items():
            endpoint, _, outcome = what.partition(" ")
            calls[(endpoint, outcome)] = n  # the client is shared: same counts per channel
    metric(
        "groq_calls_total",
        "counter",
        "Groq calls by endpoint and outcome",
        [({"endpoint": e, "outcome": o}, n) for (e, o), n in sorted(calls.items())],
    )
    return "\n".join(out) + "\n"
