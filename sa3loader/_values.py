"""Final tensor values for checkpoint names, read the fastest safe way for the device.

Upstream copies each checkpoint tensor into the model's tensor (a cast on the
CPU), moves the model, then casts to fp16 on the device. ``Values`` gives the
same bits: a tensor whose file bytes already are the final value (the fp16
sibling's, or a source tensor of the model's dtype) is read as is, in bulk and
in file order; any other is cast in upstream's order.

Only sa3loader's own sibling, which it publishes atomically (a rewrite is a
new inode) and read-only, may back weights by a mapping (``io="mmap"``). The
user's checkpoint is always read into fresh memory: training jobs rewrite
checkpoints in place, which would change a mapped model's weights under it,
and a truncation would kill it with SIGBUS. On other devices every file is
streamed through the staging ring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

import torch

from . import _faults
from ._config import IoMode
from ._crew import started
from ._dtypes import torch_dtype
from ._format import Header, reading
from ._host import network_filesystem
from ._io import MappedFile, read_into, stream_into

# A sibling value f16(x) equals upstream's result for x only when the model
# tensor it lands in holds x exactly first (f16, f32, f64); else read the source.
SIBLING_SAFE_DTYPES = {torch.float16, torch.float32, torch.float64}
# Devices whose fp32 -> fp16 cast gives the CPU's bits for every value but NaN payloads
# (tested on the CPU; CUDA's cvt.rn rounds to nearest even and keeps subnormals).
SIBLING_CAST_DEVICES = frozenset({"cpu", "cuda"})

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
# The mapping measured faster than plain reads both hot and cold, and costs no
# anonymous memory (benchmarks/README.md). "read" stays for where mappings are
# unreliable, and is what network filesystems get unless asked otherwise.
DEFAULT_IO: IoMode = "mmap"


def resolve_io(chosen: IoMode | None, path: str | None = None) -> IoMode:
    """The mode asked for (``Settings.io``), else "read" when ``path`` is on a network
    filesystem (mappings there are slow and die with SIGBUS on a server hiccup), else mmap."""
    if chosen is not None:
        return chosen
    remote = network_filesystem(path) if path is not None else None
    if remote is not None:
        logger.info("%s is on %s: reading it instead of mapping it", path, remote)
        return "read"
    return DEFAULT_IO


def streams_to(device: torch.device) -> bool:
    """Whether weights go to ``device`` through the staging ring (every non-CPU device)."""
    return _faults.fact("streams_to", device.type, device.type != "cpu")


class Values:
    """Final tensor values for checkpoint names, following upstream's cast chain."""

    def __init__(
        self,
        source: Header,
        sibling: Header | None,
        half: bool,
        io: IoMode = DEFAULT_IO,
        *,
        pin: bool = True,
        ring: tuple[int, int] | None = None,
    ) -> None:
        self.source, self.sibling, self.half, self.io = source, sibling, half, io
        self.pin = pin  # stage in pinned memory when streaming to a device ($SA3LOADER_PIN)
        self.ring = ring  # (slots, bytes per slot) of the staging ring ($SA3LOADER_RING), or the default
        self._maps: dict[str, MappedFile] = {}
        self._early: dict[str, threading.Thread] = {}  # path -> thread faulting in its data
        self._stop_early = threading.Event()
        self.bytes_read = 0  # placed by reading the file into fresh memory (or streaming it)
        self.bytes_mapped = 0  # placed as views of the sibling's mapping: read when first touched
        self._views: set[int] = set()  # ids of the views counted in bytes_mapped
        self.read_seconds, self.staging_bytes, self.staging_pinned = 0.0, 0, False

    @property
    def cpu_io(self) -> IoMode:
        """How CPU weights are read: ``io`` for the sibling; the user's checkpoint is always read."""
        return self.io if self.sibling is not None else "read"

    def __enter__(self) -> Values:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """Join the early prefetch; after a failure, first stop it where it is."""
        if exc_type is not None:
            self._stop_early.set()
        for thread in self._early.values():
            thread.join()

    def _maps_allowed(self, header: Header) -> bool:
        return header is self.sibling and self.io == "mmap"

    def tensor(self, header: Header, name: str) -> torch.Tensor:
        """The file's tensor on the CPU: a view of the sibling's mapping, or a fresh read."""
        entry = header.by_name[name]
        if not self._maps_allowed(header):
            out = torch.empty(entry.torch_shape, dtype=torch_dtype(entry.dtype, header.path))
            with reading(header) as fd:
                read_into(header.path, [out], [header.data_start + entry.begin], fd=fd)
            return out
        return self._mapped(header).tensor(entry)

    def read_source(self, name: str) -> torch.Tensor:
        """The checkpoint's own tensor, read into fresh memory as ``load_file`` gives it (counted)."""
        return self._counted(self.source, name)

    def _counted(self, header: Header, name: str) -> torch.Tensor:
        """``tensor``, its bytes counted as read into fresh memory, or mapped (a view: ``copied``)."""
        value = self.tensor(header, name)
        entry = header.by_name[name]
        if self._maps_allowed(header) and self._mapped(header).maps(entry):
            self.bytes_mapped += entry.nbytes
            self._views.add(id(value))
        else:
            self.bytes_read += entry.nbytes
        return value

    def copied(self, view: torch.Tensor) -> None:
        """A copy of ``view`` is placed, not the view: its bytes were read into fresh memory."""
        if id(view) in self._views:
            self._views.discard(id(view))
            self.bytes_mapped -= view.nbytes
            self.bytes_read += view.nbytes

    def _mapped(self, header: Header) -> MappedFile:
        if header.path not in self._maps:
            self._maps[header.path] = MappedFile(header)
        return self._maps[header.path]

    def prefetch_early(self, device: torch.device) -> None:
        """Start faulting in the file most weights will come from, on a background thread, before
        the factory runs: building the model (SA3's loads the text encoder too) overlaps reading
        the DiT's weights. Only the sibling's mapping is touched; nothing is placed until asked."""
        header = self.sibling
        if streams_to(device) or header is None or not self._maps_allowed(header):
            return
        entries = [e for e in header.entries if e.nbytes]
        if not entries:
            return
        mapped = self._mapped(header)
        offsets = [header.data_start + e.begin for e in entries]
        thread = threading.Thread(
            target=mapped.prefetch,
            args=(offsets, [e.nbytes for e in entries], self._stop_early),
            daemon=True,
            name="sa3loader-prefetch",
        )
        if started(thread, without=f"no early prefetch of {header.path}: placing faults its pages in"):
            self._early[header.path] = thread

    def _as_is(self, name: str, model_dtype: torch.dtype, device: torch.device) -> Header | None:
        """The file whose bytes are already the final value on ``device``, if one is."""
        dtype = self.source.by_name[name].dtype
        if self.sibling is not None and dtype == "F32" and model_dtype in SIBLING_SAFE_DTYPES:
            # fp16(x), what upstream ends with, where the device's cast is known to be the
            # CPU's: round to nearest even, subnormals kept (CUDA's cvt.rn has no flush to
            # zero). Elsewhere (mps, ...) upstream's own cast runs on the device.
            return self.sibling if device.type in SIBLING_CAST_DEVICES else None
        if torch_dtype(dtype, self.source.path) == model_dtype and not (
            self.half and model_dtype.is_floating_point and model_dtype != torch.float16
        ):
            # The sibling holds every other dtype byte for byte, and may be mapped.
            return self.sibling if self.sibling is not None else self.source
        return None

    def get(
        self, name: str, model_dtype: torch.dtype, *, final: bool = True, device: torch.device = _CPU
    ) -> torch.Tensor:
        """The value upstream ends with: copy into ``model_dtype`` (CPU), move, then fp16 if half.

        ``final=False`` stops after the copy into ``model_dtype``: for copying into
        an existing tensor, which the closing ``model.to(float16)`` casts.
        """
        header = self._as_is(name, model_dtype, device) if final else None
        if header is not None:
            return self._counted(header, name).to(device)
        value = self._counted(self.source, name)
        if value.dtype != model_dtype:
            value = value.to(model_dtype)
        value = value.to(device)
        if final and self.half and value.is_floating_point() and value.dtype != torch.float16:
            value = value.to(torch.float16)  # on the device, as upstream's model.to(float16)
        return value

    def forget_counts(self) -> None:
        """Start the counters again (a build that was abandoned does not count)."""
        self.bytes_read = self.bytes_mapped = 0
        self._views.clear()
        self.read_seconds = 0.0
        self.staging_bytes = 0

    def get_many(self, wanted: list[tuple[str, torch.dtype]], device: torch.device) -> list[torch.Tensor]:
        """``get`` for many names, the byte-exact ones read in bulk, in file order; timed."""
        started = time.perf_counter()
        try:
            return self._get_many(wanted, device)
        finally:
            self.read_seconds += time.perf_counter() - started

    def _get_many(self, wanted: list[tuple[str, torch.dtype]], device: torch.device) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(wanted)
        by_file: dict[str, list[int]] = defaultdict(list)
        headers = {h.path: h for h in (self.source, self.sibling) if h is not None}
        for i, (name, dtype) in enumerate(wanted):
            header = self._as_is(name, dtype, device)
            if header is None:
                out[i] = self.get(name, dtype, device=device)
            else:
                by_file[header.path].append(i)
        for path, indices in by_file.items():
            header = headers[path]
            entries = [header.by_name[wanted[i][0]] for i in indices]
            offsets = [header.data_start + e.begin for e in entries]
            streamed = streams_to(device)
            if not streamed and self._maps_allowed(header):
                for i, entry in zip(indices, entries, strict=True):
                    out[i] = self._counted(header, entry.name)
                early = self._early.get(path)
                if early is not None:  # it faults in every tensor of the file
                    early.join()
                else:
                    self._maps[path].prefetch(offsets, [e.nbytes for e in entries])
                continue
            self.bytes_read += sum(e.nbytes for e in entries)
            dests = [
                torch.empty(e.torch_shape, dtype=torch_dtype(e.dtype, header.path), device=device)
                for e in entries
            ]
            if not streamed:
                with reading(header) as fd:
                    read_into(header.path, dests, offsets, fd=fd)
            else:
                with reading(header) as fd:
                    slots, chunk = self.ring if self.ring is not None else (None, None)
                    stats = stream_into(
                        header.path, dests, offsets, fd=fd, pin=self.pin, slots=slots, chunk_bytes=chunk
                    )
                self.staging_bytes = max(self.staging_bytes, stats.staging_bytes)
                self.staging_pinned = self.staging_pinned or stats.pinned
                if header is self.sibling:  # an fp16 model tensor was cast on the CPU upstream too
                    recast = [
                        k
                        for k, i in enumerate(indices)
                        if wanted[i][1] != torch.float16 and dests[k].is_floating_point()  # NaN needs a float
                    ]
                    names = [wanted[indices[k]][0] for k in recast]
                    _recast_nans_on_device(self, names, [dests[k] for k in recast], device)
            for i, dest in zip(indices, dests, strict=True):
                out[i] = dest
        return [t for t in out if t is not None]


def _recast_nans_on_device(
    values_of: Values, names: list[str], values: list[torch.Tensor], device: torch.device
) -> None:
    """Redo fp16 casts of NaN-holding tensors on the device, as upstream casts there.

    The sibling was cast on the CPU, which keeps a NaN's payload; CUDA's cast
    gives the canonical NaN. Only NaN bits can differ, so only those tensors
    are read again from the fp32 source.
    """
    if not values:
        return
    # A sum is NaN when a value is (or when +inf meets -inf: a harmless recast), and
    # needs no full-size temporary as isnan() does. One sync for all.
    flags = torch.stack([v.sum(dtype=torch.float32).isnan() for v in values]).cpu()
    for i in flags.nonzero().flatten().tolist():
        fp32 = values_of.tensor(values_of.source, names[i]).to(device)
        values[i].copy_(fp32.to(torch.float16))
