"""The benchmark's files: synthetic full-size SA3 checkpoints served from an offline hub,
hot and cold page-cache states, and the floor (``cat``).

Shared by ``bench_load.py`` and ``ab_versions.py``; imports only sa3loader's public API (none, here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))  # tests/support: the offline hub, the upstream source, rss_anon

from support.hub_fixture import SA3_REPO, hf_env  # noqa: E402
from support.upstream_env import find_upstream  # noqa: E402

SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class Model:
    layout: Path
    config: str  # file name under the upstream source's configs/
    repo_id: str  # where upstream's model_configs looks for it


MODELS = {
    "medium": Model(
        SHARED / "layouts" / "sa3_medium_layout.json",
        "sa3_medium_model_config.json",
        "stabilityai/stable-audio-3-medium",
    ),
    "small-music": Model(
        SHARED / "layouts" / "sa3_small_music_layout.json",
        "sa3_small_music_model_config.reconstructed.json",
        SA3_REPO,
    ),
}

ENCODER_SIZE = "b-b"

PAGE = os.sysconf("SC_PAGE_SIZE")

DISK_MARGIN = 1.15

# On the dev box's virtual disk a read right after POSIX_FADV_DONTNEED is still
# served fast (the host caches it); a few seconds later it is truly cold. Every
# cold figure (loads and cat alike) waits this long after the drop, so they compare fairly.
COLD_SETTLE_S = 8.0

WRITE_CHUNK_ELEMENTS = 4 * 1024 * 1024


def model_config(model: Model, scale: float) -> dict:
    config = json.loads((find_upstream() / "configs" / model.config).read_text())
    dit = config["model"]["diffusion"]["config"]
    dit["depth"] = max(1, round(dit["depth"] * scale))
    return config


def drop_cache(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def settle_cold(paths: tuple[Path, ...] | list[Path]) -> None:
    drop_cache(*paths)
    time.sleep(COLD_SETTLE_S)


@dataclass
class Bench:
    """Where this run's files are: the hub (HF_HOME), the served checkpoint, the cache dir."""

    args: argparse.Namespace
    hf_home: Path
    ckpt: Path  # the snapshot's model.safetensors (a symlink to its blob)
    config: Path
    encoder: Path  # the T5Gemma weights, dropped with the checkpoint for cold runs
    cache: Path
    sibling: Path | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **hf_env(self.hf_home),
            "SA3LOADER_PROGRESS": "0",
            "SA3LOADER_CACHE_DIR": str(self.cache),
        }

    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.ckpt, self.encoder, self.sibling) if p is not None)


def time_cat(path: Path, cold: bool = False) -> float:
    if cold:
        settle_cold([path])
    started = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def write_checkpoint(layout_path: Path, depth: int, path: Path) -> int:
    """Random fp32 values in the layout's keys/shapes, without DiT blocks at or past ``depth``.

    The model is not built to list its keys: that would load the text encoder. A
    layout that does not fit the config shows up as a hit that is not fast. The
    file is written here, a chunk at a time (``save_file`` would need every tensor
    in memory), as the safetensors format says: an 8-byte header length, the
    JSON header padded to 8 bytes, then the tensors in offset order.
    """
    import torch

    block = re.compile(r"^model\.model\.transformer\.layers\.(\d+)\.")
    entries = json.loads(layout_path.read_text())["state_dict"]
    kept = sorted(
        (e for e in entries if not ((m := block.match(e["key"])) and int(m.group(1)) >= depth)),
        key=lambda e: e["key"],
    )
    assert {e["dtype"] for e in kept} <= {"float32"}, "the synthetic writer fills float32 tensors only"
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in kept:
        nbytes = 4 * math.prod(e["shape"])
        header[e["key"]] = {"dtype": "F32", "shape": e["shape"], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    gen = torch.Generator().manual_seed(0)
    values = torch.empty(WRITE_CHUNK_ELEMENTS, dtype=torch.float32)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for e in kept:
            remaining = math.prod(e["shape"])
            while remaining:
                n = min(remaining, WRITE_CHUNK_ELEMENTS)
                values[:n].normal_(0.0, 0.02, generator=gen)
                f.write(values[:n].numpy().tobytes())
                remaining -= n
    return path.stat().st_size


def set_up(args: argparse.Namespace, work: Path) -> Bench:
    """The offline hub: the b-b encoder in the small-music repo, the model in its own repo."""
    from support.hub_fixture import ENCODER_SUBFOLDER, REVISION, write_encoder, write_model

    model = MODELS[args.model]
    hf_home = work / "hf"
    marker = work / "written.json"
    wanted = {"model": args.model, "scale": args.scale, "encoder": ENCODER_SIZE}
    config = model_config(model, args.scale)
    snapshot = hf_home / "hub" / ("models--" + model.repo_id.replace("/", "--")) / "snapshots" / REVISION
    if not (args.keep and marker.exists() and json.loads(marker.read_text()) == wanted):
        shutil.rmtree(hf_home, ignore_errors=True)
        marker.unlink(missing_ok=True)
        started = time.perf_counter()
        write_encoder(hf_home, ENCODER_SIZE)
        raw = work / "model.safetensors"
        size = write_checkpoint(model.layout, config["model"]["diffusion"]["config"]["depth"], raw)
        assert write_model(hf_home, config, raw, model.repo_id) == snapshot
        marker.write_text(json.dumps(wanted))
        print(
            f"wrote {args.model} ({size / 1e9:.2f} GB fp32, scale {args.scale}) and the {ENCODER_SIZE} "
            f"text encoder into {hf_home} in {time.perf_counter() - started:.0f}s"
        )
    encoder = next(hf_home.glob(f"hub/*/snapshots/*/{ENCODER_SUBFOLDER}/model.safetensors"))
    return Bench(
        args, hf_home, snapshot / "model.safetensors", snapshot / "model_config.json", encoder, work / "cache"
    )


def prepare(temp: str, bench: Bench) -> tuple[Path, ...]:
    """Hot: read every file into the page cache now. Cold: the files to drop just before timing."""
    if temp == "hot":
        for path in bench.files():
            if path.exists():
                warm(path)
        return ()
    return bench.files()


def workdir_and_scale(args: argparse.Namespace) -> Path:
    """The work dir (on disk), shrinking ``--scale`` with a message when it lacks room."""
    work = Path(args.workdir).resolve()
    if str(work).startswith("/dev/shm"):
        raise SystemExit("--workdir must be on disk, not /dev/shm (RAM)")
    work.mkdir(parents=True, exist_ok=True)
    layout_info = json.loads(MODELS[args.model].layout.read_text())["summary"]
    free = shutil.disk_usage(work).free
    need = lambda s: (layout_info["bytes_fp32"] + layout_info["bytes_fp16"]) * s * DISK_MARGIN  # noqa: E731
    while need(args.scale) > free and args.scale > 0.05:
        new = round(args.scale / 2, 3)
        print(
            f"only {free / 1e9:.1f} GB free in {work}: scale {args.scale} needs "
            f"{need(args.scale) / 1e9:.1f} GB; trying scale {new}"
        )
        args.scale = new
    return work


def cpu_bench_parser(doc: str | None, runs: int) -> argparse.ArgumentParser:
    """The options every CPU benchmark on the synthetic hub takes: model, scale, runs, workdir, keep."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="small-music")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--workdir", default=str(REPO / "bench-data"))
    parser.add_argument("--keep", action="store_true", help="reuse the synthetic files of an earlier run")
    return parser
