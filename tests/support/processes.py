"""Loads in fresh processes, as users' would be: ``python -m support.child ...``.

Most are forked from a zygote that has done the imports already (``support.zygote``):
the same fresh process, without 3 s of importing torch each time.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from support.zygote import READY

TESTS = Path(__file__).resolve().parents[1]
# A load in a fresh process takes seconds; one that hangs fails its test instead of the suite.
LOAD_TIMEOUT_S = 120


def child_env(dim: int = 32, extra: dict[str, str] | None = None) -> dict[str, str]:
    # One thread each: eight processes on two cores otherwise spin in OpenMP barriers.
    return {
        **os.environ,
        "TOY_DIM": str(dim),
        "PYTHONPATH": str(TESTS),
        "SA3LOADER_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    }


def child_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "support.child", *args]


def start_child(*args: str, dim: int = 32, extra_env: dict | None = None, **kwargs) -> subprocess.Popen:
    """``support.child`` started now, its output piped."""
    return subprocess.Popen(
        child_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(dim, extra_env),
        **kwargs,
    )


def fork_child(*args: str, dim: int = 32, extra_env: dict | None = None) -> ForkedChild:
    """``support.child`` forked now from the session's zygote, its output captured."""
    return toy_zygote().start("support.child", *args, env=child_env(dim, extra_env))


def report(child: ForkedChild | subprocess.Popen, timeout: float = LOAD_TIMEOUT_S) -> dict:
    """The JSON report a ``load`` child printed last, once it has exited well."""
    out, err = child.communicate(timeout=timeout)
    assert child.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def load_in_a_child(ckpt: Path, cache: Path, dim: int = 32, extra_env: dict | None = None) -> dict:
    """One toy load in a fresh process; its report (converted, cache_hit, digest)."""
    return report(fork_child("load", str(ckpt), str(cache), dim=dim, extra_env=extra_env))


def load_at_once(ckpt: Path, caches: list[Path], env: dict[str, str], dim: int) -> list[dict]:
    """One child process per cache dir, all started together; their reports, in order."""
    children = [fork_child("load", str(ckpt), str(cache), dim=dim, extra_env=env) for cache in caches]
    return [report(child, timeout=300) for child in children]


def hidden_from_others(*paths: str | Path) -> str | None:
    """The first of ``paths`` (or a folder above one) that a user who is neither its owner nor in
    its group cannot reach: a checkout cloned into a private home, say. None: all readable."""
    for path in paths:
        path = Path(os.path.abspath(path))  # as named: a link's target is the OS's to check
        for folder in reversed(path.parents):
            if not folder.stat().st_mode & 0o001:
                return str(folder)
        if not path.stat().st_mode & (0o005 if path.is_dir() else 0o004):
            return str(path)
    return None


class ForkedChild:
    """A child forked by a ``Zygote``: ``communicate`` and ``returncode`` as ``subprocess.Popen``'s."""

    def __init__(self, zygote: Zygote, argv: list[str], pid: int, stdout: Path, stderr: Path) -> None:
        self.args, self.pid, self.returncode = argv, pid, None
        self._zygote, self._stdout, self._stderr = zygote, stdout, stderr

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        if self.returncode is None:
            try:
                self.returncode = self._zygote.ask({"wait": self.pid}, timeout)["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)  # as subprocess.run does; the zygote reaps it
                self.returncode = self._zygote.ask({"wait": self.pid}, LOAD_TIMEOUT_S)["returncode"]
                raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
        return self._stdout.read_text(errors="replace"), self._stderr.read_text(errors="replace")


class Zygote:
    """A ``support.zygote`` process: its children start with their imports done (see there).

    ``env`` is the environment it imports under; each child gets its own.
    """

    def __init__(self, preload: list[str], env: dict[str, str], *, as_user: list[str] | None = None) -> None:
        """``as_user``: a command that runs the rest as another user (``setpriv ...``)."""
        self._outputs = tempfile.TemporaryDirectory(prefix="sa3loader-zygote-")
        os.chmod(self._outputs.name, 0o711)  # its children may run as another user
        self._children = 0
        self._proc = subprocess.Popen(
            [*(as_user or []), sys.executable, "-m", "support.zygote", *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd="/",
            start_new_session=True,
        )
        ready = self._readline(LOAD_TIMEOUT_S)
        assert ready.strip() == READY, f"the zygote did not start: {ready!r}"

    def _readline(self, timeout: float | None) -> str:
        assert self._proc.stdout is not None
        readable, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not readable:
            raise subprocess.TimeoutExpired(self._proc.args, timeout or 0)
        return self._proc.stdout.readline()

    def ask(self, request: dict, timeout: float | None) -> dict:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._readline(timeout)
        assert line, f"the zygote exited ({self._proc.poll()})"
        return json.loads(line)

    def start(self, module: str, *args: str, env: dict[str, str], cwd: Path | None = None) -> ForkedChild:
        """``python -m module args`` (``module`` ``-c``: ``python -c CODE``) with ``env``, forked now."""
        self._children += 1
        out, err = (Path(self._outputs.name) / f"{self._children}.{kind}" for kind in ("out", "err"))
        for path in (out, err):  # writable by a child that runs as another user
            path.touch()
            path.chmod(0o666)
        argv = [module, *args]
        request = {"start": argv, "env": env, "stdout": str(out), "stderr": str(err), "cwd": str(cwd or "")}
        pid = self.ask(request, LOAD_TIMEOUT_S)["pid"]
        return ForkedChild(self, argv, pid, out, err)

    def run(
        self, module: str, *args: str, env: dict[str, str], timeout: float, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``subprocess.run(..., capture_output=True, text=True)`` of ``python -m module args``."""
        child = self.start(module, *args, env=env, cwd=cwd)
        out, err = child.communicate(timeout)
        return subprocess.CompletedProcess(child.args, child.returncode, out, err)

    def close(self) -> None:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)  # and any child a failed test left running
            self._proc.wait()
        self._outputs.cleanup()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What a toy child imports before it runs: torch (with its lazy meta-device imports), then ours.
TORCH_PRELOAD = ("support.zygote:torch_lazy_imports", "support.toymodel")
TOY_PRELOAD = ("support.zygote:torch_lazy_imports", "support.child")


@functools.cache
def _session_zygote(preload: tuple[str, ...]) -> Zygote:
    """One zygote per preload for the whole session, closed when it ends."""
    zygote = Zygote(list(preload), child_env())
    atexit.register(zygote.close)
    return zygote


def torch_zygote() -> Zygote:
    """A zygote that has imported torch but not sa3loader, for what sa3loader does on import."""
    return _session_zygote(TORCH_PRELOAD)


def toy_zygote() -> Zygote:
    """The zygote of the toy children (``support.child``, sa3loader imported)."""
    return _session_zygote(TOY_PRELOAD)


def dead_pid() -> int:
    """The pid of a process of this host that has ended (a killed writer's, as names carry it)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def left_long_ago(path: Path, seconds: float = 3600.0) -> Path:
    """``path`` (and all in it) last changed ``seconds`` ago: what a killed writer left, not a
    writer of another pid namespace still at work (``_places.WRITER_QUIET_S``)."""
    then = time.time() - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (then, then), follow_symlinks=False)
    return path
