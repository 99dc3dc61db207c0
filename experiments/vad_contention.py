"""Voice activity under interpreter-lock contention: torch module vs the same maths in numpy.

At 16 channels on an H200 the live process's voice-activity calls took 75-360 ms (p95 per 30 s)
for a network that needs well under a millisecond (experiments/LOG.md, 2026-12-02 evening).
A suspect is the interpreter lock: each torch op releases it and takes it back, and under
contention every take may wait up to the switch interval. This probe runs ``--threads`` channel
threads, each pushing one 32 ms window every 32 ms (features + one LSTM step, as the live
``VoiceActivity`` does), beside ``--busy`` threads that run pure Python, and prints the push
latency. ``--impl numpy`` runs the silero-vad network re-written in numpy (checked against the
torch module first: the largest probability difference is printed); it takes the lock far fewer
times per push. Not a live-process measurement: a stand-in for its threads.

    python experiments/vad_contention.py --impl torch --threads 16 --busy 2 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np
import torch

from musetalk_rt.audio.vad import load_silero_vad


def _conv1d(x, w, b, stride=1, pad=0):
    """``x`` [B, C, L], ``w`` [O, C, K] -> [B, O, L_out], as ``torch.nn.functional.conv1d``."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    n, c, length = x.shape
    o, _, k = w.shape
    lo = (length - k) // stride + 1
    idx = np.arange(lo)[:, None] * stride + np.arange(k)[None, :]  # [lo, K]
    cols = x[:, :, idx].transpose(0, 2, 1, 3).reshape(n * lo, c * k)  # [B * lo, C * K]
    out = cols @ w.reshape(o, c * k).T
    if b is not None:
        out = out + b
    return out.reshape(n, lo, o).transpose(0, 2, 1)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class NumpyVad:
    """silero-vad's 16 kHz network (``SileroVadNet``) in numpy, from the module's weights."""

    def __init__(self, net):
        sd = net.state_dict()
        self.p = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in sd.items()}

    def features(self, x):  # [B, 576] -> [B, 128]
        p = self.p
        x = np.pad(x, ((0, 0), (0, 64)), mode="reflect")[:, None, :]  # [B, 1, 640]
        spec = _conv1d(x, p["stft_conv.weight"], None, stride=128)  # [B, 258, 4]
        mag = np.sqrt(spec[:, :129] ** 2 + spec[:, 129:] ** 2)
        h = np.maximum(_conv1d(mag, p["conv1.weight"], p["conv1.bias"], 1, 1), 0)
        h = np.maximum(_conv1d(h, p["conv2.weight"], p["conv2.bias"], 2, 1), 0)
        h = np.maximum(_conv1d(h, p["conv3.weight"], p["conv3.bias"], 2, 1), 0)
        return np.maximum(_conv1d(h, p["conv4.weight"], p["conv4.bias"], 1, 1), 0)[:, :, 0]

    def step(self, h, state):  # [B, 128] + (h, c) -> probability [B], (h, c)
        p = self.p
        hx, cx = state if state is not None else (np.zeros((len(h), 128), np.float32),) * 2
        g = (
            h @ p["lstm_cell.weight_ih"].T
            + p["lstm_cell.bias_ih"]
            + hx @ p["lstm_cell.weight_hh"].T
            + p["lstm_cell.bias_hh"]
        )
        i, f, gg, o = np.split(g, 4, axis=1)  # torch's gate order
        c2 = _sigmoid(f) * cx + _sigmoid(i) * np.tanh(gg)
        h2 = _sigmoid(o) * np.tanh(c2)
        logit = np.maximum(h2, 0) @ p["final_conv.weight"][:, :, 0].T + p["final_conv.bias"]
        return _sigmoid(logit)[:, 0], (h2, c2)


def max_prob_diff(net, nv, windows: int = 50) -> float:
    """Largest probability difference, torch module vs numpy, over a chain of random windows."""
    x = (np.random.default_rng(0).standard_normal((windows, 576)) * 0.1).astype(np.float32)
    st_t = st_n = None
    worst = 0.0
    with torch.inference_mode():
        ft = net.features(torch.from_numpy(x))
    fn = nv.features(x)
    for i in range(windows):
        with torch.inference_mode():
            pt, st_t = net.step(ft[i : i + 1], st_t)
        pn, st_n = nv.step(fn[i : i + 1], st_n)
        worst = max(worst, abs(float(pt[0]) - float(pn[0])))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=["torch", "numpy"], default="torch")
    ap.add_argument("--threads", type=int, default=16, help="channel threads")
    ap.add_argument("--busy", type=int, default=0, help="threads running pure Python")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--switch-interval-ms", type=float, help="sys.setswitchinterval (5 default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    net = load_silero_vad()
    nv = NumpyVad(net)
    diff = max_prob_diff(net, nv)
    stop = threading.Event()
    lat_ms: list[float] = []

    def push(x, st):
        if args.impl == "torch":
            with torch.inference_mode():
                prob, st = net.step(net.features(torch.from_numpy(x)), st)
        else:
            prob, st = nv.step(nv.features(x), st)
        return float(prob[0]), st

    def channel():
        st = None
        x = (np.random.default_rng().standard_normal((1, 576)) * 0.1).astype(np.float32)
        due = time.monotonic()
        while not stop.is_set():
            due += 0.032
            t = time.monotonic()
            _, st = push(x, st)
            lat_ms.append((time.monotonic() - t) * 1000.0)
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)

    def busy():
        while not stop.is_set():
            s = 0
            for i in range(20000):
                s += i

    threads = [threading.Thread(target=channel) for _ in range(args.threads)]
    threads += [threading.Thread(target=busy) for _ in range(args.busy)]
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    lat = sorted(lat_ms)
    row = {
        "impl": args.impl,
        "threads": args.threads,
        "busy": args.busy,
        "switch_interval_ms": args.switch_interval_ms or 5.0,
        "pushes": len(lat),
        "pushes_due": int(args.threads * args.seconds / 0.032),
        "p50_ms": round(lat[len(lat) // 2], 2),
        "p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 2),
        "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 2),
        "max_prob_diff_vs_torch": diff,
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
