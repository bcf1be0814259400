"""Logging: the ``sa3loader`` logger, quiet by default, and the SA3LOADER_VERBOSITY switch.

Each case is a fresh process that imports sa3loader itself (forked from a zygote that
has imported torch only), as SA3LOADER_VERBOSITY is applied on import."""

from __future__ import annotations

import pytest
import torch
from support.checkpoints import random_like_state, save
from support.processes import child_env, torch_zygote
from support.toymodel import build

LOAD = """
import sys, torch
import sa3loader
from support.toymodel import build
torch.manual_seed(0)
sa3loader.load_diffusion_cond({{}}, {ckpt!r}, "cpu", True, cache_dir={cache!r}, model_factory=build)
"""


@pytest.mark.parametrize(("verbosity", "shown"), [(None, False), ("info", True), ("WARNING", False)])
def test_sa3loader_verbosity_shows_the_librarys_log_where_logging_is_not_configured(
    tmp_path, verbosity, shown
):
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    env = child_env(extra={"SA3LOADER_VERBOSITY": verbosity} if verbosity else {})
    script = LOAD.format(ckpt=str(ckpt), cache=str(tmp_path / "c"))
    proc = torch_zygote().run("-c", script, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sa3loader: INFO: ")]
    assert bool(lines) == shown, proc.stderr
    if shown:
        assert f"sa3loader: INFO: loaded {ckpt}: converted, fast build" in proc.stderr


def test_a_verbosity_that_is_no_level_warns(tmp_path):
    env = child_env(extra={"SA3LOADER_VERBOSITY": "loud"})
    proc = torch_zygote().run("-c", "import sa3loader", env=env, timeout=120)
    assert proc.returncode == 0
    assert (
        "ignoring $SA3LOADER_VERBOSITY='loud': not one of debug, info, warning, error, critical"
        in proc.stderr
    )


FORK_WHILE_LOGGING = """
import os, signal, threading
from sa3loader import _config

holding, release = threading.Event(), threading.Event()

def hold():
    with _config.ONCE._guard:  # another thread inside warn_once at the fork
        holding.set()
        release.wait(30)

threading.Thread(target=hold).start()
holding.wait(30)
pid = os.fork()
if pid == 0:
    signal.alarm(10)  # a child that waits on the guard dies here
    _config.warn_once("fork", "logged in the child")
    os._exit(0)
_, status = os.waitpid(pid, 0)
release.set()
print(os.waitstatus_to_exitcode(status))
"""


def test_a_child_forked_while_another_thread_logs_can_log():
    proc = torch_zygote().run("-c", FORK_WHILE_LOGGING, env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"], proc.stderr
