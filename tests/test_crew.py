"""``run_crew`` returns only once no worker runs: after Ctrl-C (however often), and after a
thread that could not be started; ``map_on_crew`` (reads and the prefetch) on top of it. What a
conversion frees next (its files, its mappings) is then touched by no one
(tests/test_survives_crashes.py: the same through a real conversion)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from support.faults import interrupt_main_thread, sent_all, thread_starts_refused

from sa3loader._crew import map_on_crew, run_crew


class Workers:
    """Targets that each run until stopped (or for ``seconds``), recording when they end."""

    def __init__(self, count: int, seconds: float = 10.0) -> None:
        self.stopped = threading.Event()
        self.started: list[int] = []
        self.ended: list[float] = []
        self.seconds = seconds
        self.count = count
        self.stop_reasons: list[BaseException] = []

    def targets(self):
        return [lambda i=i: self.run(i) for i in range(self.count)]

    def run(self, i: int) -> None:
        self.started.append(i)
        self.stopped.wait(self.seconds)
        time.sleep(0.2)  # still running well after it was told to stop
        self.ended.append(time.monotonic())

    def stop(self, reason: BaseException) -> None:
        self.stop_reasons.append(reason)
        self.stopped.set()


def test_every_target_runs_once_and_has_ended_when_it_returns():
    workers = Workers(4, seconds=0.0)
    run_crew(workers.targets(), "test-crew", workers.stop)
    assert sorted(workers.started) == [0, 1, 2, 3] and len(workers.ended) == 4
    assert workers.stop_reasons == []


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to itself: POSIX")
@pytest.mark.parametrize("times", [1, 3])
def test_ctrl_c_stops_the_workers_and_is_raised_once_they_have_ended(times, ctrl_c_raises):
    workers = Workers(3)
    sender = interrupt_main_thread(after=0.3, times=times, gap=0.0005)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_crew(workers.targets(), "test-crew", workers.stop)
        raised = time.monotonic()
    finally:
        sent_all(sender)
    assert len(workers.ended) == 3 and max(workers.ended) <= raised
    assert workers.stop_reasons and all(isinstance(r, KeyboardInterrupt) for r in workers.stop_reasons)


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_workers_that_cannot_be_had_leave_the_work_to_those_that_can(monkeypatch, threads):
    workers = Workers(4, seconds=0.0)
    monkeypatch.setattr(threading.Thread, "start", thread_starts_refused("test-crew", threads))
    run_crew(workers.targets(), "test-crew", workers.stop)
    assert sorted(workers.started) == list(range(max(threads, 1)))  # none: the calling thread's
    assert len(workers.ended) == len(workers.started) and workers.stop_reasons == []


def test_a_worker_that_starts_after_the_crew_stopped_never_runs(monkeypatch):
    """Ctrl-C inside ``Thread.start`` cannot tell whether the thread runs: one that runs later
    finds the crew stopped and returns before it touches anything."""
    workers = Workers(3)
    real_start = threading.Thread.start
    late: list[threading.Thread] = []

    def start(thread):
        if thread.name == "test-crew" and not late:
            late.append(thread)
            raise KeyboardInterrupt  # as if Ctrl-C came before it ran: it runs after all
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        run_crew(workers.targets(), "test-crew", workers.stop)
    real_start(late[0])  # it runs now, the crew long stopped
    late[0].join()
    assert workers.started == []


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_map_on_crew_does_every_item_once_on_the_threads_it_can_have(monkeypatch, threads):
    monkeypatch.setattr(threading.Thread, "start", thread_starts_refused("test-map", threads))
    done: list[int] = []
    ran_on: set[str] = set()

    def do(item: int) -> None:
        ran_on.add(threading.current_thread().name)
        done.append(item)

    map_on_crew(do, range(50), threads=4, name="test-map")
    assert sorted(done) == list(range(50))
    assert ran_on <= ({"test-map"} if threads else {threading.current_thread().name})


def test_map_on_crew_raises_the_first_error_once_no_item_runs():
    """An item that fails stops the others at their next item; the error is raised only after
    every item that started has ended (what they read into is freed after)."""
    ended: list[int] = []

    def do(item: int) -> None:
        if item == 3:
            raise OSError("a read failed")
        time.sleep(0.01)
        ended.append(item)

    with pytest.raises(OSError, match="a read failed"):
        map_on_crew(do, range(100), threads=4, name="test-map")
    settled = list(ended)
    time.sleep(0.1)
    assert ended == settled and len(ended) < 99  # none ran on after; the rest were skipped


TEAM_CHILD = """
import os, threading, time, torch
from sa3loader._crew import map_on_crew
grown = []
def caller():
    map_on_crew(lambda item: None, range(4), threads=2, name="test-map")
    while any(t.name == "test-map" for t in threading.enumerate()):
        time.sleep(0.01)
    time.sleep(0.2)  # their OS threads gone too
    before = len(os.listdir("/proc/self/task"))
    torch.empty(1 << 16).fill_(0)  # the caller's first parallel op of its own
    grown.append(len(os.listdir("/proc/self/task")) - before)
thread = threading.Thread(target=caller)  # a fresh thread: no OpenMP team yet
thread.start()
thread.join()
print(grown[0])
"""


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2, reason="needs /proc and 2 cores"
)
def test_the_callers_openmp_team_is_made_before_a_thread_of_ours_takes_a_pid():
    """At a pids limit the caller's first parallel op (the plain recipe makes the same) failed in
    libgomp, which ends the process, once our threads had taken the pids its team needed (an
    attack, as a service user). Made first, it takes no thread later. In a new process: another
    test's threads may have left libgomp threads to reuse."""
    child = subprocess.run([sys.executable, "-c", TEAM_CHILD], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "0", child.stdout + child.stderr
