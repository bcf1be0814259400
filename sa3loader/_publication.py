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

logger = logging.getLogger(__name__)

_pending: set[threading.Thread] = set()
_pending_lock = threading.Lock()


class Publication:
    """``publish`` to run on a thread once ``start`` is called, then close ``held`` (the
    conversion lock) there. Started when the load is done with the sibling: a cold load's
    reads (the text encoder, the checkpoint) do not share the disk with the fsync's writes."""

    def __init__(self, publish: Callable[[], None], held: contextlib.ExitStack, what: str) -> None:
        self._publish, self._held, self._what = publish, held, what
        self._thread = threading.Thread(target=self._run, name="sa3loader-publish", daemon=False)

    def _run(self) -> None:
        try:
            with self._held:
                self._publish()
        except Exception as exc:  # nobody is left to raise it to
            logger.warning(
                "could not publish the fp16 sibling %s (%s); the next load converts it again", self._what, exc
            )
        finally:
            with _pending_lock:
                _pending.discard(self._thread)

    def start(self) -> None:
        with _pending_lock:
            _pending.add(self._thread)
        self._thread.start()


def wait_for_publishing(timeout: float | None = None) -> bool:
    """Wait until every fp16 sibling this process converted is published; False on timeout.

    A first load returns once the sibling's bytes are written; its fsync,
    rename and index row finish on a background thread, which Python also
    waits for at exit.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _pending_lock:
            pending = next(iter(_pending), None)
        if pending is None:
            return True
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        pending.join(left)


def _forget_in_child() -> None:
    """A forked child has none of the parent's threads: nothing of theirs to wait for."""
    global _pending_lock
    _pending.clear()
    _pending_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
