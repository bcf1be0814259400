"""Worker threads that must all be gone before what they share is freed: ``run_crew``, and
``map_on_crew`` on it; ``started``, a thread or word of what goes without it (a pids limit).

Not ``Thread.join``: on CPython before 3.13 a join that Ctrl-C interrupts marks the thread
stopped, and the next join returns at once while the thread still runs. A conversion that
closed its files and mappings then had workers writing into memory no longer mapped (SIGSEGV)
or into a descriptor number reused by another file. Here each worker counts itself in before
it touches anything and out when it ends; once the crew is stopped, a worker that has not
counted in never does (it returns at once), so "none counted in" means none can touch anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


def started(thread: threading.Thread, without: str) -> bool:
    """Start ``thread``, or say (logged) what is done ``without`` it where no thread can be had (a
    pids limit: ``Thread.start`` raises RuntimeError only then); whether it started."""
    try:
        thread.start()
    except RuntimeError as exc:
        logger.info("%s (%s)", without, exc)
        return False
    return True


class _Crew:
    def __init__(self) -> None:
        self.size = 0  # workers that run: set before ``wait``
        self._changed = threading.Condition()
        self._running = 0  # counted in, not yet out
        self._ended = 0  # counted out, or refused once stopped
        self._stopped = False

    def work(self, target: Callable[[], None]) -> None:
        with self._changed:
            refused = self._stopped
            self._running += not refused
        try:
            if not refused:
                target()
        finally:
            with self._changed:
                self._running -= not refused
                self._ended += 1
                self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True

    def over(self) -> bool:
        """Every worker ended, or the crew is stopped and none is counted in."""
        return self._running == 0 and (self._stopped or self._ended == self.size)

    def wait(self) -> None:
        with self._changed:
            while not self.over():
                self._changed.wait()


def run_crew(targets: Sequence[Callable[[], None]], name: str, stop: Callable[[BaseException], None]) -> None:
    """Run the targets, interchangeable workers (each takes work until none is left), each on a
    thread of its own while threads can be had (none at all, a pids limit: the first runs on the
    calling thread); return once none runs. Ctrl-C while starting or waiting (as often as it
    comes) calls ``stop`` (which makes the targets return at their next step), waits for those
    counted in, and is raised then."""
    crew = _Crew()
    interrupted: BaseException | None = None
    try:
        for target in targets:
            # A new Thread's start raises RuntimeError only when no thread can be had (a limit,
            # the interpreter shutting down): those started do the work.
            try:
                threading.Thread(target=crew.work, args=(target,), name=name).start()
            except RuntimeError as exc:
                logger.info("%d of %d %s threads started (%s)", crew.size, len(targets), name, exc)
                break
            crew.size += 1
        if crew.size == 0 and targets:
            crew.size = 1
            crew.work(targets[0])
    except BaseException as exc:  # Ctrl-C: those started are stopped
        interrupted = exc
    while True:
        try:
            if interrupted is not None:  # inside the try: Ctrl-C again here is caught too
                crew.stop()
                stop(interrupted)
            crew.wait()
            break
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def map_on_crew(function: Callable[[Item], object], items: Sequence[Item], threads: int, name: str) -> None:
    """``function`` on every item, on up to ``threads`` threads of ``run_crew`` (so on the calling
    thread where none can be had, and never still running once this returns, Ctrl-C or not): not
    ``ThreadPoolExecutor``, whose ``submit`` raises a bare RuntimeError where no thread can be had.
    The first error stops the others at their next item and is raised once none runs."""
    lock = threading.Lock()
    left = list(reversed(items))
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if errors or not left:
                    return
                item = left.pop()
            try:
                function(item)
            except BaseException as exc:  # raised by the caller, once no worker runs
                with lock:
                    errors.append(exc)
                return

    def stop(exc: BaseException) -> None:
        with lock:
            errors.append(exc)

    run_crew([worker] * min(threads, len(items)), name, stop=stop)
    if errors:
        raise errors[0]
