"""The command line in this process, with its output captured as a subprocess's would be."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import traceback
from pathlib import Path

from sa3loader import cli


def run(*args: str, cache: Path, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    """``sa3loader --cache-dir CACHE ARGS`` in this process, output captured as a subprocess's would be."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(["--cache-dir", str(cache), *args])
        except SystemExit as exc:  # argparse: --help, bad usage
            rc = int(exc.code or 0)
        except Exception:  # --debug lets errors through, with their traceback
            traceback.print_exc()
            rc = 1
    proc = subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr + proc.stdout
    return proc


def run_process(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """``python -m sa3loader --cache-dir CACHE ARGS`` in a fresh process that imports sa3loader
    itself (forked from a zygote that has imported torch only)."""
    from support.processes import torch_zygote

    return torch_zygote().run(
        "sa3loader", "--cache-dir", str(cache), *args, env=dict(os.environ), timeout=120
    )
