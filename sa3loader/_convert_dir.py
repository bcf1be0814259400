"""Ahead-of-time conversion: one file, or a whole checkpoint directory (``model.safetensors``,
a config, a ``t5gemma-b-b-ul2/`` folder) to ``<dir>-fp16`` or in place: every ``.safetensors``
file with fp32 tensors streamed to fp16, everything else copied byte for byte; ``.cache``
folders and sa3loader's own siblings, locks and temp files skipped."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from . import _compare, _convert, _faults
from ._convert_targets import HUB_HARM, in_place_target, refuse_hub_output, refuse_output_over_source
from ._format import Header, open_for_reading, open_header, read_header
from ._identity import (
    FINGERPRINT_VERSION,
    fingerprint,
    has_float32,
    identity_of,
    is_sa3loader_path,
    sibling_matches_source,
    sibling_metadata,
)
from ._places import (
    INCOMPLETE_INFIX,
    LOCK_SUFFIX,
    SAFETENSORS_SUFFIX,
    SIBLING_SUFFIXES,
    WRITER_QUIET_S,
    WRITER_TAIL,
    beside_path,
    cache_path,
    in_hub_repo,
    incomplete_prefix,
    is_temp_name,
    left_by_a_gone_writer,
    legacy_beside_path,
    process_gone,
    quiet_for,
    temp_files_of,
)
from ._range_report import WIDER_THAN_FP16
from ._records import SourceIdentity
from ._trust import ACL_XATTR, NEW_FILE_MODE, acl_of, owned_file_problem, readers_bits, share_new_file
from .errors import (
    CheckpointChangedError,
    ConfigError,
    HubCacheError,
    OutputExistsError,
    Sa3LoaderError,
)

logger = logging.getLogger(__name__)

SKIPPED_DIRS = {".cache"}
OUTPUT_DIR_SUFFIX = "-fp16"


@dataclass
class FileAction:
    """What happened to one file."""

    source: str
    output: str
    action: str  # "converted", "copied", "skipped", "unchanged"
    # The range report's counts; None: not counted (a sibling found whose row, which kept them,
    # is gone; a file with no float32 whose bf16 or f64 a load casts).
    overflow_to_inf: int | None = 0
    flushed_to_zero: int | None = 0
    # The content check of the output (``--verify``): None when none was made.
    max_abs_diff: float | None = None
    float_tensors: int = 0
    replaced_damaged: bool = False  # a sibling that failed the check was converted again
    # The output keeps bf16 or f64 tensors as they are: counted above as a model_half load casts them.
    casts_kept: bool = False
    note: str = ""  # why, where it says more than its action (a skipped link)


def checkpoints_in(directory: str) -> list[str]:
    """Every ``.safetensors`` checkpoint under ``directory``, in order: not sa3loader's own
    siblings, locks or temp files, nothing under ``.cache``."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        found += [
            os.path.join(root, name)
            for name in sorted(files)
            if name.endswith(SAFETENSORS_SUFFIX) and not _is_our_artifact(name, os.path.join(root, name))
        ]
    return found


def _is_our_artifact(name: str, path: str) -> bool:
    if is_temp_name(name) or name.endswith(tuple(suffix + LOCK_SUFFIX for suffix in SIBLING_SUFFIXES)):
        return True
    return name.endswith(SIBLING_SUFFIXES) and is_sa3loader_path(path)


def _convert_to(header: Header, dest: str, verify: bool, *, in_place: bool = False) -> FileAction:
    _remove_dead_writers_temps(dest)
    identity = identity_of(header)
    metadata = sibling_metadata(header, identity, fingerprint(header))
    still_read = _still_the_file_read(identity, dest) if in_place else None
    # Checked in its temp file (a name the next conversion removes, should this one be killed).
    written = _convert.write_sibling(header, dest, metadata)
    result = written.result
    action = FileAction(header.path, dest, "converted", result.overflow_to_inf, result.flushed_to_zero)
    action.casts_kept = casts_kept(header)
    if verify:
        try:
            with written.open_header() as output:
                checked(action, _compare.verify(header, output))
        except BaseException:
            written.discard()
            raise
    written.publish(still_read)
    return action


def _still_the_file_read(read: SourceIdentity, path: str) -> Callable[[], None]:
    """In place: a check, just before the rename, that ``path`` is still the file converted,
    unchanged; a checkpoint saved over it meanwhile (a trainer's ``mv``) is the user's newer
    one, never replaced by fp16 of the old. (Between this check and the rename, a few
    microseconds, a save is not seen: no rename can ask the kernel for both at once.)"""

    def check() -> None:
        try:
            now = os.stat(path)
            now_id = (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns, now.st_ctime_ns)
            same = now_id == (read.device, read.inode, read.size, read.mtime_ns, read.ctime_ns)
        except FileNotFoundError:
            same = False
        if not same:
            raise CheckpointChangedError(
                f"{path} was replaced or changed while it was converted in place: left as it is "
                "now, not overwritten (convert it again)",
                filename=path,
            )

    return check


def _remove_dead_writers_temps(dest: str) -> None:
    """Temp files a killed conversion to ``dest`` left beside it (in place, or to a file: GBs
    each), whose writer no longer runs: the next conversion to ``dest`` removes them."""
    for path in temp_files_of(dest):
        if left_by_a_gone_writer(path, dest) and owned_file_problem(path) is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def casts_kept(header: Header) -> bool:
    """Whether ``header``'s file holds bf16 or f64, which a conversion keeps and a load casts to fp16."""
    return any(entry.dtype in WIDER_THAN_FP16 for entry in header.entries)


def not_converted(header: Header, output: str, action: str) -> FileAction:
    """A file with no float32, as it is: its range report is nothing (0) where a load casts
    none of it, not counted (None) where it holds bf16 or f64 a load casts to fp16."""
    cast = casts_kept(header)
    count = None if cast else 0
    return FileAction(header.path, output, action, count, count, casts_kept=cast)


def checked(action: FileAction, comparison: _compare.Comparison) -> FileAction:
    """Record in ``action`` what its output's content check measured."""
    action.max_abs_diff = comparison.max_abs_diff
    action.float_tensors = comparison.float_tensors
    return action


def convert_file(
    src: str, out: str | None = None, *, in_place: bool = False, force: bool = False, verify: bool = False
) -> FileAction:
    """Convert one checkpoint file to ``out``, or in place (the sibling a load uses: ``cli``)."""
    if out is None and not in_place:
        raise ValueError("convert_file needs out= or in_place=True")
    if out is not None and not in_place:  # a copy too: refused before anything is read or written
        refuse_output_over_source(src, out)
        refuse_hub_output(out, os.path.dirname(os.path.abspath(out)))
        if os.path.isdir(out) and not os.path.islink(out):
            raise OutputExistsError(f"{out} is a folder: give --out the output file's name", filename=out)
        if os.path.lexists(out) and not force:  # a link to nothing too: the user's, never replaced unasked
            raise OutputExistsError(f"{out} exists; pass --force to replace it", filename=out)
    with open_header(src) as header:
        if not has_float32(header):  # a marker in its metadata (copied from a sibling) is not fp16
            if in_place or out is None:
                return not_converted(header, src, "unchanged")
            _copy(src, out)
            return not_converted(header, out, "copied")
        if in_place:  # the file the symlink points to: the same one ``header`` reads
            target = in_place_target(src)
            before, acl = os.stat(target), acl_of(target)
            action = _convert_to(header, target, verify, in_place=True)
            _give_back(target, before, acl)
            return action
        assert out is not None
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        return _convert_to(header, out, verify)


def _give_back(target: str, before: os.stat_result, acl: bytes | None) -> None:
    """The replaced file's mode, ACL, and owner (root converting another user's file), for the
    file just written at ``target``: opened without following a link, and changed only while it
    is one file of ours (a link, or a hard link to another file, swapped in since stays as is)."""
    _faults.point("give back", target)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        now = os.fstat(fd)
        if stat.S_ISREG(now.st_mode) and now.st_nlink == 1 and now.st_uid == os.geteuid():
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
            if acl is not None:
                os.setxattr(fd, ACL_XATTR, acl)
            if before.st_uid != os.geteuid():
                os.fchown(fd, before.st_uid, -1)
    finally:
        os.close(fd)


def _copy(src: str, dst: str) -> None:
    """``src``'s bytes to ``dst`` through a temp file of our own (0600 until its mode is set)
    renamed over it: a link at ``dst`` is replaced, never written through, and the copy is never
    readable by more people than ``src``, not even while it is written."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    _remove_dead_writers_temps(dst)
    tmp = f"{incomplete_prefix(dst)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        # open_for_reading: a FIFO (which would wait for a writer), a device, a socket refused, typed
        with (
            open(open_for_reading(src, kind="source"), "rb") as reader,
            open(os.open(tmp, flags, NEW_FILE_MODE), "wb") as writer,
        ):
            source = os.fstat(reader.fileno())
            share_new_file(writer.fileno(), source, readers_bits(src, source, tmp))  # before a byte
            shutil.copyfileobj(reader, writer, COPY_CHUNK_BYTES)
            writer.flush()
            os.fsync(writer.fileno())  # durable before its name, as a converted file is
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


COPY_CHUNK_BYTES = 16 << 20


ASIDE_INFIX = ".replaced-"  # <out>.replaced-<pid>-<hex>: the output replaced, until the new one is in


def _writer_pid(name: str, infix: str) -> int | None:
    """The pid in a name ``_heal_output`` may act on (``<pid>-<8 hex>``); None: not convert's."""
    match = WRITER_TAIL.fullmatch(name.split(infix, 1)[1]) if infix in name else None
    return int(match.group(1)) if match else None


def _yours(path: str) -> bool:  # root's convert removes no other user's folder that looks like its own
    return _owner_in(path, (os.getuid(),))


def _owner_in(path: str, owners: tuple[int | None, ...]) -> bool:
    with contextlib.suppress(OSError):  # gone meanwhile: nothing to act on
        return os.lstat(path).st_uid in owners
    return False


def _owner_of(path: str) -> int | None:
    with contextlib.suppress(OSError):
        return os.stat(path).st_uid
    return None


def _heal_output(out_dir: str) -> None:
    """Undo what a killed ``convert DIR`` left beside ``out_dir``: the previous state comes back."""
    parent, base = os.path.split(out_dir)
    for name in sorted(os.listdir(parent or ".")):
        path = os.path.join(parent, name)
        for infix in (ASIDE_INFIX, INCOMPLETE_INFIX):
            if not name.startswith(base + infix):
                continue
            pid = _writer_pid(name, base + infix)
            if pid is None or not process_gone(pid):
                continue  # someone's own folder; a convert at work (this process's too); no pid of ours
            if infix == INCOMPLETE_INFIX and not quiet_for(path, WRITER_QUIET_S):
                continue  # being filled by a convert of another pid namespace (a container)
            back = infix == ASIDE_INFIX and not os.path.lexists(out_dir)  # killed between its renames
            if back and _owner_in(path, (os.getuid(), _owner_of(parent or "."))):
                os.rename(path, out_dir)  # the old output back: yours, or its folder owner's
            elif infix == ASIDE_INFIX and os.path.islink(out_dir):  # put there since: not an output of ours
                logger.warning("%s is an old output a killed convert set aside: left for you", path)
            elif _yours(path) and not back:
                _remove_ours(path)
            else:  # planted by someone who could not put it at the output's name: never adopted
                logger.warning("%s is named as a convert's leftover but is not yours: left as it is", path)


def _publish_dir(staging: str, out_dir: str) -> None:
    """Rename the finished output into place; an old one goes aside first, then away."""
    if not os.path.lexists(out_dir):  # a link to nothing is set aside too (no dir renames over it)
        os.rename(staging, out_dir)
        return
    aside = f"{out_dir}{ASIDE_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, aside)
    os.rename(staging, out_dir)
    _remove_ours(aside)


def _remove_ours(path: str) -> None:
    """A dir convert staged or set aside; an output that was a link: the link, not what it names."""
    shutil.rmtree(path, ignore_errors=True)  # refuses a link (ignored): unlinked below
    with contextlib.suppress(OSError):  # gone already (a dir), or a dir rmtree could not empty
        os.unlink(path)
    if os.path.lexists(path):  # a folder in it you may not empty: said, not left unseen
        logger.warning(
            "%s could not be removed (some of it is not yours to delete): remove it yourself", path
        )


def convert_tree(
    src_dir: str,
    out_dir: str | None = None,
    *,
    in_place: bool = False,
    force: bool = False,
    verify: bool = False,
) -> list[FileAction]:
    """Convert a checkpoint directory to ``<dir>-fp16`` (or in place, atomically per file).

    A new output is built in a temp dir beside it and renamed into place at the
    end: a failure, Ctrl-C or kill leaves the previous state (the next run
    clears what a kill left), never a half-filled output.
    """
    src_dir = os.path.abspath(src_dir)
    if out_dir is None and in_hub_repo(src_dir):
        raise HubCacheError(
            f"{src_dir} is inside a Hugging Face hub cache, which sa3loader never writes into "
            f"({HUB_HARM[in_place]}). Pass --out DIR to write the fp16 copy elsewhere; "
            "loads keep their siblings in the sa3loader cache dir.",
            filename=src_dir,
        )
    if not checkpoints_in(src_dir):  # an fp16 copy of nothing, or a name mistyped
        raise ConfigError(f"no .safetensors checkpoint in {src_dir}: nothing to convert", filename=src_dir)
    if in_place:
        for path in checkpoints_in(src_dir):  # refused before anything is written
            in_place_target(path, src_dir)
        return _convert_files(src_dir, None, in_place=True, verify=verify, excluded=set())
    out_dir = os.path.abspath(out_dir or src_dir.rstrip(os.sep) + OUTPUT_DIR_SUFFIX)
    refuse_output_over_source(src_dir, out_dir)
    refuse_hub_output(out_dir, out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    _heal_output(out_dir)
    if os.path.lexists(out_dir) and not force:
        raise OutputExistsError(f"{out_dir} exists; pass --force to replace it", filename=out_dir)
    staging = f"{out_dir}{INCOMPLETE_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(staging, readers_bits(src_dir, os.stat(src_dir), staging) | 0o700)  # none in who could not enter
    try:
        actions = _convert_files(src_dir, staging, in_place=False, verify=verify, excluded={out_dir, staging})
        _publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for action in actions:  # report where the files are now
        if action.output.startswith(staging + os.sep):
            action.output = out_dir + action.output[len(staging) :]
    return actions


def _linked_folders_left_out(
    root: str, dirs: list[str], walked: set[str], in_place: bool
) -> list[FileAction]:
    """Take out of ``dirs`` (to walk) each link to a folder not to walk: in place, any; in a copy,
    one to a folder walked already (a loop) or to the output. Each is reported, with why."""
    left_out = []
    for name in list(dirs):
        path = os.path.join(root, name)
        if os.path.islink(path) and (in_place or os.path.realpath(path) in walked):
            dirs.remove(name)
            why = "not rewritten in place" if in_place else "its folder is copied already, or is the output"
            left_out.append(FileAction(path, path, "skipped", note=f"a link to a folder: {why}"))
        walked.add(os.path.realpath(path))
    return left_out


def _convert_files(
    src_dir: str, out_dir: str | None, *, in_place: bool, verify: bool, excluded: set[str]
) -> list[FileAction]:
    actions: list[FileAction] = []
    walked = {os.path.realpath(src_dir)} | set(map(os.path.realpath, excluded))  # a loop; the output
    # A copy follows links to folders (a shared encoder folder linked in is part of the model);
    # in place, a linked folder is outside what was asked to be rewritten.
    for root, dirs, files in os.walk(src_dir, followlinks=not in_place):
        if out_dir is not None:  # empty folders too
            os.makedirs(os.path.join(out_dir, os.path.relpath(root, src_dir)), exist_ok=True)
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and os.path.join(root, d) not in excluded)
        actions += _linked_folders_left_out(root, dirs, walked, in_place)
        for name in sorted(files):
            path = os.path.join(root, name)
            dest = path if out_dir is None else os.path.join(out_dir, os.path.relpath(path, src_dir))
            if not os.path.exists(path):  # a link to nothing, or (not listed) a dead writer's
                if os.path.lexists(path):  # temp file a conversion before it removed
                    actions.append(
                        FileAction(path, dest, "skipped", note="a link to a file that does not exist")
                    )
                continue
            if not os.path.isfile(path):  # a FIFO (a copy would wait for its writer), a device
                actions.append(FileAction(path, dest, "skipped", note="not a regular file"))
                continue
            if _is_our_artifact(name, path):
                actions.append(FileAction(path, dest, "skipped"))
                continue
            if name.endswith(SAFETENSORS_SUFFIX):
                out = None if in_place else dest
                actions.append(convert_file(path, out, in_place=in_place, force=True, verify=verify))
                continue
            if in_place:
                actions.append(FileAction(path, path, "unchanged"))
            else:
                _copy(path, dest)
                actions.append(FileAction(path, dest, "copied"))
    return actions


def sibling_places(header: Header, cache_dir: str) -> tuple[str, ...]:
    """Where a load looks for this checkpoint's sibling."""
    real, blob = os.path.realpath(header.path), identity_of(header).blob
    return (
        beside_path(header.path),
        legacy_beside_path(header.path),
        cache_path(cache_dir, header.path, real, blob),
    )


def existing_sibling(header: Header, places: tuple[str, ...]) -> str | None:
    """The sibling a load would use, when one made for this very checkpoint is at one of its
    ``places`` (``sibling_places``) already."""
    for path in places:
        try:
            sibling = read_header(path, follow_symlinks=False)
        except (Sa3LoaderError, OSError):
            continue
        if sibling_matches_source(sibling, header):
            return path
    return None


def sibling_size(header: Header) -> int:
    """The exact size of the sibling a load would write: its header holds sa3loader's metadata,
    whose one unknown before reading the file, the fingerprint, has a fixed length."""
    placeholder = FINGERPRINT_VERSION + ":" + "0" * 64
    metadata = sibling_metadata(header, identity_of(header), placeholder)
    return _convert.output_size(header, metadata)
