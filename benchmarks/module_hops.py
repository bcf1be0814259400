"""How far a reader must jump to follow a load through the package: module hops.

    python benchmarks/module_hops.py

Runs a first load and then a cache hit of the toy model (``tests/support/toymodel.py``) under
``sys.setprofile`` and follows them as a reader would: each sa3loader function is
read once, at its first call, with everything it calls (a function called again is
not read again; dunder methods and properties are followed into, but are not
themselves jumps: ``with x:`` or ``entry.nbytes`` does not send a reader to another file).
Along that walk it counts

- hops: moves from one module to another, into a callee or back to its caller;
- returns: calls into a module the walk had already been in and left (the reader
  climbs back up to a file it has already read part of).

The package's structure is good for readers when both are small: a load should read
top to bottom, visiting each concept once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
PACKAGE = "sa3loader"


class Walk:
    """The modules a reader visits, in order, each function read once."""

    def __init__(self) -> None:
        self.modules: list[tuple[str, str]] = []  # (module, "call" or "return")
        self.read: set[Any] = set()
        self.skipping: FrameType | None = None  # a function read before: its whole call is skipped

    def module_of(self, frame: FrameType) -> str | None:
        name = frame.f_globals.get("__name__", "")
        return name if name == PACKAGE or name.startswith(PACKAGE + ".") else None

    @staticmethod
    def transparent(frame: FrameType) -> bool:
        """Dunder methods and properties: a reader reads what they call, but ``with x:``,
        ``Values(...)`` or ``entry.nbytes`` is not a jump to another file."""
        name = frame.f_code.co_name
        if name.startswith("__") and name.endswith("__"):
            return True
        owner = frame.f_locals.get("self")
        return owner is not None and isinstance(getattr(type(owner), name, None), property)

    def caller_module(self, frame: FrameType) -> str | None:
        """The module of the nearest sa3loader caller that is not transparent."""
        caller = frame.f_back
        while caller is not None and (self.module_of(caller) is None or self.transparent(caller)):
            caller = caller.f_back
        return None if caller is None else self.module_of(caller)

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event not in ("call", "return"):
            return
        if self.skipping is not None:
            if event == "return" and frame is self.skipping:
                self.skipping = None
            return
        module = self.module_of(frame)
        if module is None or self.transparent(frame):
            return
        if event == "call":
            if frame.f_code in self.read:
                self.skipping = frame
                return
            self.read.add(frame.f_code)
            self.modules.append((module, "call"))
        else:
            caller = self.caller_module(frame)
            if caller is not None:
                self.modules.append((caller, "return"))

    def counts(self) -> dict[str, int]:
        hops = returns = 0
        left: set[str] = set()
        current = self.modules[0][0]
        for module, kind in self.modules[1:]:
            if module == current:
                continue
            hops += 1
            left.add(current)
            if kind == "call" and module in left:
                returns += 1
            current = module
        return {"hops": hops, "returns": returns, "modules": len({m for m, _ in self.modules})}


def main() -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    sys.path.insert(0, str(TESTS))
    import torch
    from support.checkpoints import random_like_state, save
    from support.toymodel import build

    import sa3loader

    results = {}
    with tempfile.TemporaryDirectory() as temp:
        torch.manual_seed(0)
        ckpt = save(random_like_state(build(), seed=3), Path(temp) / "model.safetensors")
        past = time.time_ns() - 60 * 10**9  # downloaded a minute ago: a hit needs no fingerprint
        os.utime(ckpt, ns=(past, past))
        for name in ("first load", "cache hit"):
            walk = Walk()
            torch.manual_seed(0)
            sys.setprofile(walk)
            try:
                sa3loader.load_diffusion_cond(
                    {}, ckpt, "cpu", True, cache_dir=Path(temp) / "c", model_factory=build
                )
            finally:
                sys.setprofile(None)
            results[name] = walk.counts()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
