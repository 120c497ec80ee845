"""Peak resident memory of a block of work, sampled in a thread (ru_maxrss only knows the process peak)."""

from __future__ import annotations

import threading

import psutil


class PeakRSS:
    """Context manager: `peak_mib` is the highest RSS seen while inside, `start_mib` the RSS on entry."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.start_mib = 0.0
        self.peak_mib = 0.0

    def _sample(self) -> None:
        rss = self._process.memory_info().rss / 2**20
        self.peak_mib = max(self.peak_mib, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self.start_mib = self._process.memory_info().rss / 2**20
        self.peak_mib = self.start_mib
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
