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
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


OURS = "sa3loader-"  # the name of every thread sa3loader starts
# torch's at::internal::GRAIN_SIZE: elementwise ops on fewer elements run on the calling thread.
PARALLEL_GRAIN = 32768


class _CallerTeams:
    """Which threads have made their OpenMP team: the one piece of process state here; a forked
    child has no team (libgomp makes it again there), so it starts with none made."""

    def __init__(self) -> None:
        self.made = threading.local()

    def reset_in_child(self) -> None:
        self.made = threading.local()

    def first(self) -> None:
        """The calling thread's OpenMP team, made now if it is not yet: its first parallel op
        needs threads, and ours must not take the pids it needs first (at a pids limit libgomp
        then ends the process where the plain recipe, which makes the same team, loads: an
        attack, as a service user). Our own threads run one thread's ops (``_serial``)."""
        if not getattr(self.made, "team", False) and not threading.current_thread().name.startswith(OURS):
            with torch._C.DisableTorchFunction():  # not a factory's op to a watch or a device mode
                torch.empty(2 * PARALLEL_GRAIN).fill_(0)  # above torch's grain: a parallel op
            self.made.team = True


_caller_teams = _CallerTeams()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_caller_teams.reset_in_child)


def started(thread: threading.Thread, without: str) -> bool:
    """Start ``thread``, or say (logged) what is done ``without`` it where no thread can be had (a
    pids limit, the interpreter shutting down: ``Thread.start`` raises RuntimeError only then);
    whether it started."""
    _caller_teams.first()
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

    def hire(self, targets: Sequence[Callable[[], None]], name: str) -> None:
        """A thread for each target while threads can be had (``started``); ``size`` counts them."""
        for target in targets:
            worker = threading.Thread(target=self.work, args=(target,), name=name)
            if not started(worker, without=f"{self.size} of {len(targets)} {name} threads started"):
                return  # those started do the work
            self.size += 1

    def stop(self) -> None:
        with self._changed:
            self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped

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
        crew.hire(targets, name)
        if crew.size == 0 and targets:
            crew.size = 1
            crew.work(targets[0])
    except BaseException as exc:  # Ctrl-C: those started are stopped
        interrupted = exc
    _wait_for_none_running(crew, interrupted, stop)


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


# How often an idle helper looks whether its crew was stopped.
IDLE_CHECK_S = 0.05
Handed = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]  # a submitted call


class Helpers:
    """Up to ``count`` threads, each running the calls ``submit`` hands over, each call once (a
    ``Future``); where none could start (a pids limit), ``submit`` runs the call at once. Not
    ``ThreadPoolExecutor``: its ``submit`` raises a bare RuntimeError where no thread can be had,
    and its exit joins with ``Thread.join``, which Ctrl-C cuts short (CPython < 3.13): a helper
    then read on into memory freed after (``_io.stream_into``'s ring). The exit here returns only
    once no helper runs, however many Ctrl-Cs come; a call not yet begun never runs then."""

    def __init__(self, count: int, name: str) -> None:
        self._crew = _Crew()
        self._calls: queue.Queue[Handed | None] = queue.Queue()
        self._count, self._name = count, name

    def __enter__(self) -> Helpers:
        try:
            self._crew.hire([self._serve] * self._count, self._name)
        except BaseException as exc:  # Ctrl-C while starting: those started end first
            _stop_and_wait(self._crew, exc)
        return self

    def submit(self, call: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if self._crew.size:
            self._calls.put((future, call, args))
        else:
            _run_into(future, call, args)
        return future

    def _serve(self) -> None:
        while not self._crew.stopped:
            try:
                handed = self._calls.get(timeout=IDLE_CHECK_S)
            except queue.Empty:
                continue
            if handed is None:
                return
            _run_into(*handed)

    def __exit__(self, *exc: object) -> None:
        try:
            self._crew.stop()
            for _ in range(self._crew.size):  # wakes each waiting helper (a late one sees the stop)
                self._calls.put(None)
        finally:  # Ctrl-C above: still none runs once this returns
            _stop_and_wait(self._crew, None)


def _run_into(future: Future[Any], call: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        future.set_result(call(*args))
    except BaseException as exc:  # the submitter's to raise
        future.set_exception(exc)


def _stop_and_wait(crew: _Crew, interrupted: BaseException | None) -> None:
    _wait_for_none_running(crew, interrupted, None, stop_now=True)


def _wait_for_none_running(
    crew: _Crew,
    interrupted: BaseException | None,
    stop: Callable[[BaseException], None] | None,
    stop_now: bool = False,
) -> None:
    """Wait until no worker of ``crew`` runs, catching Ctrl-C as often as it comes; the crew
    stopped at once (``stop_now``) or once interrupted, then ``stop`` called (each time: the
    targets return at their next step). Then raise ``interrupted``, or the first Ctrl-C."""
    while True:
        try:
            if stop_now or interrupted is not None:  # in the try: Ctrl-C again here is caught too
                crew.stop()
                if stop is not None and interrupted is not None:
                    stop(interrupted)
            crew.wait()
            break
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
