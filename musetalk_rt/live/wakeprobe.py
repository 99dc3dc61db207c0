"""How long a ready Python thread waits to run again: the live process's contention meter.

Every thread of the live process (feature, clock, batcher, worker, outputs) shares one
interpreter lock and the host's cores. A thread that releases the lock for a GPU wait, a queue
or an encoder call must win it back before its next line runs; while another thread runs pure
Python, that takes up to the switch interval (``sys.getswitchinterval()``, 5 ms by default),
once per release — a thread that releases the lock ten times per frame can lose 50 ms a frame.
Cores oversubscribed by encoder and BLAS threads add the OS scheduler's delay on top. Neither
shows as busy in a stack profile: the waiting thread looks idle.

:class:`WakeProbe` measures it directly: a thread that sleeps ``sleep_s`` every ``period_s``
and records how much later than asked it runs again (``[sleep_s, ...]`` → excess in ms). The
p99 of that excess is what any thread of the process pays to run again after a release.
"""

from __future__ import annotations

import threading
import time
from collections import deque


class WakeProbe:
    """A daemon thread measuring the wake-up delay of a Python thread in this process.

    Args:
        period_s: Time between measurements.
        sleep_s: The sleep measured (it releases the interpreter lock).
        keep: Measurements kept (the last ``keep``; 3,000 at 10 ms = 30 s).
    """

    def __init__(self, period_s: float = 0.01, sleep_s: float = 0.001, keep: int = 3000):
        self.period_s, self.sleep_s = period_s, sleep_s
        self.delays_ms: deque[float] = deque(maxlen=keep)
        self.count = 0
        self.max_ms = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wake probe", daemon=True)

    def start(self) -> WakeProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            t = time.perf_counter()
            time.sleep(self.sleep_s)
            excess_ms = max(0.0, (time.perf_counter() - t - self.sleep_s) * 1000)
            self.delays_ms.append(excess_ms)
            self.count += 1
            self.max_ms = max(self.max_ms, excess_ms)

    def summary(self) -> dict:
        """``{"p50_ms", "p99_ms", "max_ms", "samples"}`` over the kept measurements."""
        d = sorted(self.delays_ms)
        if not d:
            return {"p50_ms": None, "p99_ms": None, "max_ms": None, "samples": 0}

        def q(p: float) -> float:
            return round(d[int(p * (len(d) - 1))], 2)

        return {
            "p50_ms": q(0.5),
            "p99_ms": q(0.99),
            "max_ms": round(self.max_ms, 2),
            "samples": self.count,
        }
