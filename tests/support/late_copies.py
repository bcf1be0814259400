"""Device copies that land late, for testing the staging ring's waits on the CPU."""

from __future__ import annotations

import queue
import threading
import time

from sa3loader._io import DeviceCopies

LATE_S = 0.002  # long enough for a reader to refill a slot, were it allowed to


class LateCopies(DeviceCopies):
    """Copies that land later, on another thread, as a GPU runs them after the host moves on."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.landed: dict[int, threading.Event] = {}
        self.worker = threading.Thread(target=self._run, daemon=True)
        self.worker.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            pairs, landed = job
            time.sleep(LATE_S)
            for dest, src in pairs:
                dest.copy_(src)
            landed.set()

    def send(self, slot, pairs):
        self.landed[slot] = threading.Event()
        self.jobs.put((pairs, self.landed[slot]))

    def wait(self, slot):
        if slot in self.landed:
            self.landed[slot].wait()

    def finish(self):
        self.jobs.put(None)
        self.worker.join()
