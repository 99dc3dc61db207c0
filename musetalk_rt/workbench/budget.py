"""The voice-to-screen budget as a waterfall, from one recorded ``bench e2e`` run.

The live process's playout delay is ``D = look-ahead + 20 ms chunk + canvas + 2 batches +
margin`` (``live.app.derive_delay_s``; one channel, as ``bench e2e`` runs it — several add a
per-channel term, which this waterfall would show inside the margin); the probe measured what
lies around it. A waterfall
therefore has: voice→server (sender chunking and the network), the parts of ``D`` (look-ahead,
chunk, whisper canvas, batching wait + compute, margin — blending happens inside the margin,
before the frame's deadline), encode (server→encoded minus ``D``), transport
(encoded→received: muxer interleaving, RTMP server, demuxer) and the hall player's buffer,
which the probe does not see (an assumption, labelled so).
"""

from __future__ import annotations

BUDGET_MS = 5000.0


def find_e2e_summary(
    rows: list[dict], engine: str | None = None, gpu: str | None = None, run: str | None = None
):
    """The newest ``bench e2e`` summary row with a derived delay.

    Optionally of one engine, a GPU name part and one run id (the event preset's run is cited
    in ``configs/event.toml``).
    """
    found = [
        r
        for r in rows
        if r.get("kind") == "summary"
        and r.get("delay", {}).get("derived")
        and (engine is None or r.get("engine") == engine)
        and (gpu is None or gpu.lower() in str(r.get("gpu", "")).lower())
        and (run is None or r.get("run") == run)
    ]
    if not found:
        raise ValueError(
            f"no e2e summary with a derived delay (engine={engine}, gpu={gpu}, run={run})"
        )
    return max(found, key=lambda r: r.get("time", ""))


def waterfall(summary: dict, player_buffer_ms: float = 100.0) -> list[dict]:
    """The budget's parts (p50 milliseconds) from one e2e summary row.

    Args:
        summary: A ``bench e2e`` ``kind: summary`` row whose ``D`` was derived.
        player_buffer_ms: The hall player's buffer (not measured by the probe).

    Returns:
        ``[{"part", "ms", "source"}]`` in order, then ``{"part": "total", ...}``.
    """
    d = summary["delay"]
    delay = d["delay_ms"]
    look, canvas, batch = d["lookahead_ms"], d["canvas_ms"], d["batch_ms"]
    margin = d.get("margin_ms", 100)
    run = f"{summary.get('_file', 'e2e.jsonl')} run {summary.get('run')}"
    parts = [
        ("voice→server", summary["voice_to_server_ms"]["p50"], f"measured ({run})"),
        ("look-ahead", look, "setting"),
        ("20 ms chunk", 20.0, "setting"),
        ("whisper canvas", canvas, "measured at start"),
        ("batching wait + compute (2 batches)", 2 * batch, "measured at start"),
        ("margin (blend inside)", delay - look - 20 - canvas - 2 * batch, f"margin {margin} ms"),
        ("encode", summary["server_to_encoded_ms"]["p50"] - delay, f"measured ({run})"),
        ("transport", summary["encoded_to_received_ms"]["p50"], f"measured ({run})"),
        ("player buffer", player_buffer_ms, "assumed (low-latency player)"),
    ]
    out = [{"part": p, "ms": round(float(ms), 1), "source": s} for p, ms, s in parts]
    out.append(
        {
            "part": "total",
            "ms": round(sum(r["ms"] for r in out), 1),
            "source": f"budget {BUDGET_MS:.0f} ms; measured voice→received p50 "
            f"{summary['voice_to_received_ms']['p50']} ms",
        }
    )
    return out
