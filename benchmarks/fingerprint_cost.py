"""What a start in a baked read-only image pays for the fingerprint read, hot and cold.

    python benchmarks/fingerprint_cost.py [--model small-music|medium] [--runs 5] [--keep]

In a container the image layer's device (and the file's ctime) differ from the
build's, and the index cannot be written: every start reads the source's
fingerprint (every tensor up to 1 MiB whole, five 4 KB spots of each larger one)
before it trusts the sibling. Here that is a hit whose source's ctime changed
(``chmod`` to the same mode), against a hit the index row vouches for, in
alternating pairs; each side's ``sibling_s`` (finding and checking the sibling,
from ``last_load_info().timings``) is the figure, and a ``cat`` of the sibling is
the scale. Cold: the source and the sibling dropped from the page cache first.
The factory builds an empty module: only finding the sibling is timed.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from fixtures import (
    MODELS,
    cpu_bench_parser,
    model_config,
    settle_cold,
    time_cat,
    warm,
    workdir_and_scale,
    write_checkpoint,
)

import sa3loader

# A check within a ctime's tick of a change is racy (2 s where ctimes are whole seconds): the
# index row it writes vouches for nothing, and the next load reads the fingerprint again.
RACY_S = 2.1


def sibling_seconds(ckpt: Path, cache: Path, revalidate: bool) -> tuple[float, list[str]]:
    if revalidate:
        os.chmod(ckpt, os.stat(ckpt).st_mode)  # a new ctime: as a new image layer's file
        time.sleep(RACY_S)  # the row this load writes then vouches for the next "vouched" side
    sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=cache, model_factory=lambda c: torch.nn.Module()
    )
    info = sa3loader.last_load_info()
    assert info.cache_hit, info.reason
    return info.timings["sibling_s"], info.events


def main() -> None:
    args = cpu_bench_parser(__doc__, runs=5).parse_args()
    logging.getLogger("sa3loader").setLevel(logging.ERROR)  # every key is "skipped" by the empty module
    work = workdir_and_scale(args)
    ckpt = work / "fingerprint" / "model.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    wanted = f"{args.model}:{args.scale}"
    marker = ckpt.with_suffix(".written")
    if not (args.keep and marker.exists() and marker.read_text() == wanted):
        config = model_config(MODELS[args.model], args.scale)
        write_checkpoint(MODELS[args.model].layout, config["model"]["diffusion"]["config"]["depth"], ckpt)
        marker.write_text(wanted)
    old = ckpt.stat().st_mtime_ns - 3600 * 10**9  # out of the racy window
    os.utime(ckpt, ns=(old, old))
    os.sync()  # no page left to write: a check with one records no time, and the row would be racy
    time.sleep(RACY_S)
    with tempfile.TemporaryDirectory(dir=work) as cache:
        empty = lambda config: torch.nn.Module()  # noqa: E731
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=cache, model_factory=empty)
        assert sa3loader.wait_for_publishing(600)
        sibling = Path(sa3loader.last_load_info().sibling or "")
        for temp in ("hot", "cold"):
            rows = []
            for run in range(args.runs):
                row = {}
                for side in ("vouched", "read") if run % 2 == 0 else ("read", "vouched"):
                    if temp == "cold":
                        settle_cold([ckpt, sibling])
                    else:
                        warm(ckpt)
                        warm(sibling)
                    row[side], events = sibling_seconds(ckpt, Path(cache), revalidate=side == "read")
                    assert (events == ["revalidated"]) == (side == "read"), events
                row["cat"] = time_cat(sibling, cold=temp == "cold")
                rows.append(row)
                print(temp, ", ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(
                f"\n{args.model} ({ckpt.stat().st_size / 1e9:.2f} GB), {temp}, medians of {len(rows)} pairs: "
                f"sibling check with the fingerprint read {med['read']:.3f} s, vouched by the index "
                f"{med['vouched']:.3f} s; cat of the sibling {med['cat']:.3f} s; the read costs "
                f"{med['read'] - med['vouched']:.3f} s "
                f"= {(med['read'] - med['vouched']) / med['cat']:.2f} x cat\n"
            )


if __name__ == "__main__":
    main()
