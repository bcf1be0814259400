"""Finishing a first load's sibling after the load has returned.

A first load needs the sibling's bytes, not their durability: it builds the
model from the temp file it has just written (the same inode, read through a
descriptor of its own). Making the file durable and findable, that is fsync,
rename, the directory's fsync and the index row, costs about as long as
writing it on the development machine's disk (benchmarks/README.md), so it runs
on a thread, started once the model is built, that holds the conversion lock
until it is done:

- other processes wait on the lock as they did while the file was written, then
  find the published sibling;
- Python waits for the thread at exit (it is not a daemon); ``wait_for_publishing``
  waits sooner;
- a kill before the rename leaves only the temp file, which the next conversion
  removes under the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from ._crew import started

logger = logging.getLogger(__name__)


class HeldUntilPublished(contextlib.ExitStack):
    """The lock and the temp file a publication takes over. A stack dropped before the publication
    runs (Ctrl-C as it is handed over: ``pop_all`` makes one of this class) closes itself: the lock
    is released and the temp file removed, or the next load here would wait on its own lock."""

    def __init__(self) -> None:
        super().__init__()
        self._owner = os.getpid()  # a forked child's copy is the parent's to close (``orphan``)

    def __del__(self) -> None:
        if os.getpid() == self._owner:
            self.close()


class Publication:
    """``publish`` to run on a thread, then close ``held`` (the conversion lock) there.

    Started when the load is done with the sibling, so that a cold load's reads
    (the text encoder) do not share the disk with the fsync's writes; or sooner,
    by anything in this process that needs it published (``finish``,
    ``wait_for_publishing``): a nested load of the same checkpoint, another thread.
    ``descriptors`` (the temp file's) are closed in a forked child; the lock closes its own
    (``_lock``).
    """

    def __init__(
        self, sibling: str, publish: Callable[[], None], held: contextlib.ExitStack, descriptors: list[int]
    ) -> None:
        self._key, self._publish, self._held, self._what = sibling, publish, held, sibling
        self.descriptors = [(fd, _identity(fd)) for fd in descriptors]
        self._started, self._running, self._done = False, False, threading.Event()
        self._start_lock = threading.Lock()
        _pending.add(sibling, self)

    def _run(self) -> None:
        with self._start_lock:
            if self._running:
                return
            self._running = True
        try:
            with self._held:
                self._publish()
        except Exception as exc:  # nobody is left to raise it to
            logger.warning(
                "could not publish the fp16 sibling %s (%s); the next load converts it again", self._what, exc
            )
        finally:
            _pending.remove(self._key, self)
            self._done.set()

    def start(self) -> None:
        """Start publishing, once; where no thread can be started, publish here and now."""
        with self._start_lock:
            if self._started:
                return
            self._started = True
        publisher = threading.Thread(target=self._run, name="sa3loader-publish", daemon=False)
        try:
            if not started(publisher, without="the fp16 sibling is published on this thread"):
                self._run()
        except BaseException:  # Ctrl-C inside start: the thread may run or not; the next start tries
            self._started = False  # again (a wait, the next load's), and ``_run`` runs once at most
            raise

    def orphan(self) -> None:
        """In a forked child: the parent publishes this, never the child, which closes its
        copies of the temp file's descriptor (checked by identity, not by a reused number)."""
        self._started = True
        self._done.set()
        for fd, identity in self.descriptors:
            if _identity(fd) == identity:
                os.close(fd)
        self.descriptors = []

    def wait(self, timeout: float | None = None) -> bool:
        """Start it if it is not yet, and wait for it to be done; False on timeout."""
        self.start()
        return self._done.wait(timeout)


class _Pending:
    """The publications this process has not finished, by the sibling's path (one conversion
    per sibling at a time), and what a forked child does with them: the one owner of this state.
    """

    def __init__(self) -> None:
        self._by_sibling: dict[str, Publication] = {}
        self._guard = threading.Lock()
        # Kept for good in a forked child: collected there, a publication's lock would be unlocked
        # (and its temp file removed) under the parent, which still publishes.
        self._orphans: list[Publication] = []

    def add(self, sibling: str, publication: Publication) -> None:
        with self._guard:
            self._by_sibling[sibling] = publication

    def remove(self, sibling: str, publication: Publication) -> None:
        with self._guard:
            if self._by_sibling.get(sibling) is publication:
                del self._by_sibling[sibling]

    def get(self, sibling: str) -> Publication | None:
        with self._guard:
            return self._by_sibling.get(sibling)

    def any(self) -> Publication | None:
        with self._guard:
            return next(iter(self._by_sibling.values()), None)

    def forget_in_child(self) -> None:
        """A forked child has none of the parent's threads: nothing of theirs to wait for.

        Its copies of their temp files' descriptors are closed (the locks close their own,
        ``_lock``); the publications are kept, never collected (``_orphans``).
        """
        self._guard = threading.Lock()
        for publication in self._by_sibling.values():
            self._orphans.append(publication)
            publication.orphan()
        self._by_sibling.clear()


_pending = _Pending()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pending.forget_in_child)


def finish(sibling: str) -> None:
    """Publish now, and wait for, the sibling at ``sibling`` if this process converted it: a
    load must not wait on a lock that this process holds until its own load is done."""
    pending = _pending.get(sibling)
    if pending is not None:
        pending.wait()


def wait_for_publishing(timeout: float | None = None) -> bool:
    """Wait until every fp16 sibling this process converted is published; False on timeout.

    A first load returns once the sibling's bytes are written; its fsync,
    rename and index row finish on a background thread, which Python also
    waits for at exit.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pending = _pending.any()
        if pending is None:
            return True
        left = None if deadline is None else deadline - time.monotonic()
        if (left is not None and left <= 0) or not pending.wait(left):
            return False


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino
