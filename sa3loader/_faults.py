"""The one seam through which tests reach inside the package (``tests/support/faults.py``).

Three things, each a no-op in production:

- ``point(name, subject)``: a named place where a test may stop, slow, fail or watch
  what happens (``hook``);
- ``fact(name, subject, real)``: an answer the OS gave (free space, whether a dir is
  writable, whether a person is at the terminal) that a test may replace (``facts``);
- ``tuned(name, default)``: a size a test may shrink to reach a case cheaply (how many
  elements a piece holds, how long a locked index is waited for) (``tunings``).

Points: ``convert`` (a conversion starts; the subject is the sibling), ``header``, ``data``,
``stripe`` (a worker takes the next), ``written`` (a conversion writing its temp file;
``written``: every byte is in it, before the load reads it back), ``fsync``, ``rename``,
``index`` (a sibling being published), ``locked`` (a conversion lock just taken),
``fingerprint`` (a source's fingerprint is read; the subject is its path), ``spots`` (a file
read at many small ranges: a fingerprint's, a spot check's; the subject is its path),
``built`` (the factory returned, before any weight is placed), ``import`` (upstream's factory
looked up), ``touch`` (the early prefetch faults in a piece), ``patches busy`` (a build starts
waiting for another thread's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

hook: Callable[[str, str | None], None] | None = None
facts: dict[str, Callable[[str | None, Any], Any]] = {}
tunings: dict[str, Any] = {}


def point(name: str, subject: str | None = None) -> None:
    if hook is not None:
        hook(name, subject)


def fact(name: str, subject: str | None, real: T) -> T:
    """``real``, unless a test says otherwise for ``name``."""
    override = facts.get(name)
    return real if override is None else override(subject, real)


def tuned(name: str, default: T) -> T:
    return tunings.get(name, default)
