"""The fp16 range report of a conversion: how many values the cast to fp16 turns into inf
(overflow) or zero (flushed), counted exactly, piece by piece, as the converter writes them:
a load warns of overflow, and ``convert`` reports both."""

from __future__ import annotations

import torch

FP16_INF_BITS = 0x7C00  # an fp16's bits less its sign: 0 is a zero, this inf, above it NaN
FP16_SIGN_CLEARED = 0x7FFF


def count_range(src: torch.Tensor, dst: torch.Tensor, counts: dict[str, int], scratch: torch.Tensor) -> None:
    """Add this chunk's fp16 overflows and flushes to ``counts``.

    Exact and cheap: inf in fp16 comes from inf in fp32 or an overflow, zero from
    zero or a flush, so the counts are differences; one aminmax pass over the
    fp16 chunk's bits less the sign (0 is a zero, 0x7C00 inf, above it NaN) skips
    them when there is no inf or zero at all (half the time of |x| in fp16).
    """
    # Python ints: a test on a 0-d tensor costs ten times the aminmax of a piece.
    bits = torch.bitwise_and(dst.view(torch.int16), FP16_SIGN_CLEARED, out=scratch)
    low, high = (t.item() for t in torch.aminmax(bits))
    if high >= FP16_INF_BITS:
        counts["inf"] += int(torch.count_nonzero(dst.isinf()) - torch.count_nonzero(src.isinf()))
    if low == 0:  # a zero in fp16 (+0 and -0 alike, by its bits): a flush unless the source's was
        counts["zero"] += int(torch.count_nonzero(src) - torch.count_nonzero(bits))


# Float dtypes a sibling keeps as they are, whose values may still leave fp16's range when
# the load casts them (``model.to(float16)``), and the chain upstream casts them through:
# f64 is copied into the model's fp32 first.
WIDER_THAN_FP16: dict[str, tuple[torch.dtype, ...]] = {
    "BF16": (torch.bfloat16,),
    "F64": (torch.float64, torch.float32),
    "F8_E8M0": (torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else (),
}


def count_cast_range(dtype: str, raw: memoryview, counts: dict[str, int]) -> None:
    """The range report of a piece the load casts (bf16, f64): what its cast to fp16 makes inf or 0."""
    chain = WIDER_THAN_FP16[dtype]
    if not chain or not len(raw):
        return
    src = torch.frombuffer(raw, dtype=chain[0])
    dst = src
    for step in (*chain[1:], torch.float16):
        dst = dst.to(step)
    if src.dtype.itemsize == 1:  # float8 has no isinf: count in float32, which holds every value
        src = src.to(torch.float32)
    counts["inf"] += int(torch.count_nonzero(dst.isinf()) - torch.count_nonzero(src.isinf()))
    counts["zero"] += int(torch.count_nonzero(dst == 0) - torch.count_nonzero(src == 0))
