"""The commands the README and docs/deploying.md give, run as written where they can run offline.

- the image build's download-and-warm step (docs/deploying.md), taken from the
  Dockerfile itself, against an offline hub that serves the same repo id;
- building a wheel from the checkout, as the README says to install sa3loader
  elsewhere (without build isolation: the test machine may not reach an index).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support.checkpoints import toy_hub_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEPLOYING = REPO / "docs" / "deploying.md"
MEDIUM = "stabilityai/stable-audio-3-medium"


def dockerfile_runs() -> list[str]:
    """The RUN instructions of the Dockerfile in docs/deploying.md, continuation lines joined."""
    block = re.search(r"```dockerfile\n(.*?)```", DEPLOYING.read_text(), re.S)
    assert block, "docs/deploying.md has no Dockerfile"
    text = block.group(1).replace("\\\n", " ")
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


@pytest.mark.skipif(shutil.which("hf") is None, reason="huggingface_hub's hf command is not installed")
def test_the_image_builds_download_and_warm_step_runs_as_written(tmp_path):
    (step,) = [run for run in dockerfile_runs() if "sa3loader warm" in run]
    hf_home, cache = tmp_path / "hf", tmp_path / "sa3loader-cache"
    ckpt = toy_hub_checkpoint(hf_home, MEDIUM, "0123456789abcdef", blob="3f2c9b1e")  # as hf leaves it
    command = step.replace("/opt/hf", str(hf_home))
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "SA3LOADER_CACHE_DIR": str(cache),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"made {cache} readable by every user" in proc.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "sa3loader", "cache", "ls", "--json"], capture_output=True, text=True, env=env
    )
    (row,) = json.loads(listed.stdout)
    assert row["source"] == str(ckpt) and row["status"] == "ok"
    assert row["hub"] == f"{MEDIUM}@01234567 model.safetensors"


def test_a_wheel_builds_from_the_checkout(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("sa3loader-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sa3loader/loader.py" in names and "sa3loader/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]


def test_the_image_downloads_every_repo_the_medium_config_loads_from(upstream):
    """Medium's config loads its T5Gemma text encoder from another repo (small-music's): an image
    built as the Dockerfile says, then run with HF_HUB_OFFLINE=1, must hold that one too (a new
    user found it missing)."""
    config = (upstream.root / "configs" / "sa3_medium_model_config.json").read_text()
    named = set(re.findall(r'"repo_id":\s*"([^"]+)"', config)) | {MEDIUM}
    downloaded = {run.split()[2] for run in dockerfile_runs() if run.startswith("hf download ")}
    assert named <= downloaded, named - downloaded
