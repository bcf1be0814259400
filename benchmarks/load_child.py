"""The child side of ``bench_load.py``: one timed load in a fresh process, printed as ``RESULT {json}``.

    python benchmarks/load_child.py --child upstream|convert|first|hit|encoder|load_file|h2d|ring ...

Imports (torch, stable_audio_3, transformers, sa3loader) happen before the clock
starts; peak RssAnon is sampled every 2 ms. Only sa3loader's public API is used.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from fixtures import PAGE, find_upstream, settle_cold
from support.memory import rss_anon, rss_file

SAMPLE_EVERY_S = 0.002


class PeakSampler:
    def __init__(self) -> None:
        self.base = rss_anon()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(SAMPLE_EVERY_S)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def pinned_h2d(nbytes: int) -> dict:
    """The floor for the transfer phase: pinned host-to-device copies of ``nbytes``."""
    import torch

    piece = 256 * 1024 * 1024
    host = torch.empty(piece, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(piece, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    done = 0
    while done < nbytes:
        n = min(piece, nbytes - done)
        dev[:n].copy_(host[:n], non_blocking=True)
        done += n
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "bytes": nbytes}


def time_text_encoder() -> list[float]:
    """Seconds spent in the loads upstream's t5gemma conditioner makes: tokenizer, config, encoder.

    Each class's ``from_pretrained`` is wrapped; only the outermost call counts, as
    ``AutoTokenizer`` may load the config itself. Returns a one-element list that grows.
    """
    import transformers

    spent = [0.0]
    depth = [0]
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.T5GemmaEncoderModel):
        original = cls.from_pretrained.__func__

        def timed(klass, *args, _original=original, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return _original(klass, *args, **kwargs)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent[0] += time.perf_counter() - started

        cls.from_pretrained = classmethod(timed)
    return spent


def load_text_encoder(config: dict) -> object:
    """The three loads the t5gemma conditioner makes, with its arguments, and nothing else."""
    from transformers import AutoConfig, AutoTokenizer, T5GemmaEncoderModel

    prompt = next(c["config"] for c in config["model"]["conditioning"]["configs"] if c["type"] == "t5gemma")
    repo, kwargs = prompt["repo_id"], {"subfolder": prompt["subfolder"]}
    AutoTokenizer.from_pretrained(repo, **kwargs)
    encoder_config = AutoConfig.from_pretrained(repo, **kwargs)
    encoder_config.is_encoder_decoder = False
    return T5GemmaEncoderModel.from_pretrained(repo, config=encoder_config, **kwargs).train(False)


def timed_load(args: argparse.Namespace, config: dict, out: dict) -> object:
    """The one call a load row times; sa3loader's report goes into ``out``."""
    import stable_audio_3.loading_utils as lu

    import sa3loader
    from sa3loader import cli

    if args.child == "upstream":
        return lu.load_diffusion_cond(config, args.ckpt, device=args.device, model_half=True)
    if args.child == "convert":  # what `sa3loader warm` does: make the sibling, record it
        return cli.main(["warm", args.ckpt, "--cache-dir", args.cache])
    if args.child == "encoder":
        return load_text_encoder(config)
    if args.child == "load_file":
        from safetensors.torch import load_file

        return load_file(args.ckpt, device=args.device)
    model = sa3loader.load_diffusion_cond(
        config, args.ckpt, args.device, True, cache_dir=args.cache, io=args.io
    )
    info = sa3loader.last_load_info()
    out.update(
        build=info.build,
        fallback=info.fallback,
        cache_hit=info.cache_hit,
        converted=info.converted,
        io=info.io,
        sibling=info.sibling,
        read_s=info.timings["read_s"],
        bytes_read=info.bytes_read,
        staging_bytes=info.staging_bytes,
    )
    return model


def touch_every_page(model) -> float:
    """Seconds to read one byte per page of every weight (what a first forward pass faults in)."""
    import torch

    started = time.perf_counter()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.numel():
            int(t.detach().reshape(-1).view(torch.uint8)[::PAGE].sum())
    return time.perf_counter() - started


def child(args: argparse.Namespace) -> None:
    import torch
    from support.upstream_env import import_upstream

    import_upstream(find_upstream())
    import stable_audio_3.loading_utils  # noqa: F401
    import transformers  # noqa: F401  upstream imports it inside the factory: kept out of the clock
    from transformers import AutoConfig, AutoTokenizer, T5GemmaEncoderModel  # noqa: F401

    import sa3loader  # noqa: F401

    encoder_seconds = time_text_encoder()
    config = json.loads(Path(args.config).read_text())
    if args.device == "cuda":  # CUDA context set up before the clock, as a warm server has it
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    if args.drop:  # after the imports, so the timed load starts as cold as cat does
        settle_cold([Path(p) for p in args.drop.split(",")])
    if args.child in ("h2d", "ring"):
        result = (
            pinned_h2d(Path(args.ckpt).stat().st_size)
            if args.child == "h2d"
            else __import__("bench_gpu").ring_sweep(args.ckpt, config, args.device)
        )
        print("RESULT " + json.dumps(result))
        return
    if args.start_file:  # many_workers.py: the N processes start their loads together
        print("READY", flush=True)
        while not os.path.exists(args.start_file):
            time.sleep(0.001)
    out: dict = {}
    with PeakSampler() as sampler:
        started = time.perf_counter()
        model = timed_load(args, config, out)
        if args.device == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - started
        out["encoder_s"] = encoder_seconds[0]
        if args.child == "first":  # the sibling's fsync, rename and index row run on after the load
            import sa3loader

            sa3loader.wait_for_publishing()
            out["published_s"] = time.perf_counter() - started
        if args.child == "hit" and args.device == "cpu":
            out["touch_seconds"] = touch_every_page(model)
    out.update(peak_anon=sampler.peak, base_anon=sampler.base, rss_file=rss_file(), ended_at=time.time())
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", required=True, help="which load to time")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--io", default="mmap")
    parser.add_argument("--drop", default="", help="files to drop from the page cache before timing")
    parser.add_argument(
        "--start-file", default="", help="print READY, then start the load once this file exists"
    )
    child(parser.parse_args())


if __name__ == "__main__":
    main()
