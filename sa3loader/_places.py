"""Where siblings go: their names, the places a load may put one, and the Hugging Face hub
cache's layout (known here only).

- The sibling of ``<stem>.safetensors`` is ``<stem>.fp16.safetensors``; a source named
  without the suffix gets ``<name>-fp16.safetensors``.
- It goes beside the source, in ``<folder>/.cache/sa3loader/``, when that folder is yours,
  writable and not inside a hub cache (older versions wrote it next to the source: still found), else to
  ``<cache_dir>/siblings/<key>/<name>``, keyed by the hub blob's content hash when the source
  is one (every copy of the blob shares it), else by the source's real path.
- A hub cache is ``<type>s--<org>--<name>/{snapshots/<rev>/<files>, blobs/<sha256>}``.
- Dirs sa3loader makes for them are private (0700; a hidden folder beside a checkpoint is as
  readable as the checkpoint's folder), and the cache dir is tagged so backups skip it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os
import re
import stat
import time

from . import _faults
from ._records import Removal

SIBLING_SUFFIX = ".fp16.safetensors"
UNSUFFIXED_SIBLING_SUFFIX = "-fp16.safetensors"
SHORTENED_SUFFIXES = {SIBLING_SUFFIX: ".fp16h.safetensors", UNSUFFIXED_SIBLING_SUFFIX: "-fp16h.safetensors"}
SIBLING_SUFFIXES = (SIBLING_SUFFIX, UNSUFFIXED_SIBLING_SUFFIX, *SHORTENED_SUFFIXES.values())
SAFETENSORS_SUFFIX = ".safetensors"
SIBLINGS_SUBDIR = "siblings"
INDEX_SUBDIR = "index"  # the index (``_index``)
# Room left on the filesystem after writing a sibling.
FREE_SPACE_MARGIN_BYTES = 64 * 1024 * 1024

# huggingface_hub names a repo's cache folder by its type: models--org--name, datasets--…, spaces--….
HF_REPO_FOLDER_PREFIXES = ("models--", "datasets--", "spaces--")
HF_REPO_SUBFOLDERS = ("snapshots", "blobs")
HUB_REPO_TYPES = {"models": "", "datasets": "datasets/", "spaces": "spaces/"}
# An LFS file's blob is named by the sha256 of its content (huggingface_hub checks it on download).
HF_BLOB_NAME = re.compile(r"[0-9a-f]{64}")


def in_hf_hub_cache(path: str) -> bool:
    """True for paths inside a Hugging Face hub cache (``<type>s--*/snapshots|blobs``, every repo type)."""
    for candidate in {os.path.abspath(path), os.path.realpath(path)}:
        parts = candidate.split(os.sep)
        for i, part in enumerate(parts[:-1]):
            if part.startswith(HF_REPO_FOLDER_PREFIXES) and parts[i + 1] in HF_REPO_SUBFOLDERS:
                return True
    return False


def in_hub_repo(directory: str) -> bool:
    """Inside a hub repo folder (``models--org--name`` and below), or its snapshots and blobs."""
    parts = os.path.realpath(directory).split(os.sep) + directory.split(os.sep)
    return in_hf_hub_cache(directory) or any(p.startswith(HF_REPO_FOLDER_PREFIXES) for p in parts)


def blob_name(real_path: str) -> str | None:
    """The sha256 a hub cache names the file at ``real_path`` by, when it is
    ``<type>s--*/blobs/<sha256>`` (a 64-hex LFS name, not a git blob's sha1)."""
    parts = real_path.split(os.sep)
    if len(parts) < 3 or parts[-2] != "blobs" or not parts[-3].startswith(HF_REPO_FOLDER_PREFIXES):
        return None
    return parts[-1] if HF_BLOB_NAME.fullmatch(parts[-1]) else None


def hub_name(path: str) -> str | None:
    """``org/name@revision file`` for a file in a Hugging Face hub cache snapshot, as ``hf`` names it."""
    parts = os.path.abspath(path).split(os.sep)
    for i, part in enumerate(parts[:-3]):
        kind, sep, repo = part.partition("--")
        if sep and kind in HUB_REPO_TYPES and parts[i + 1] == "snapshots":
            repo_id = HUB_REPO_TYPES[kind] + repo.replace("--", "/", 1)
            return f"{repo_id}@{parts[i + 2][:8]} {'/'.join(parts[i + 3 :])}"
    return None


# A file name's limit, in bytes (Linux and macOS filesystems), and the most that sa3loader
# appends to a sibling's name: ".incomplete-written-<boot id>-<inf>-<zero>-<pid>-<random>"
# (about 100 bytes) or ".lock".
NAME_MAX = 255
DERIVED_NAME_ROOM = 110
MAX_SIBLING_NAME = NAME_MAX - DERIVED_NAME_ROOM


def _name_bytes(name: str) -> int:
    return len(os.fsencode(name))


def fitted(name: str, suffix: str, limit: int) -> str:
    """``name + suffix``, or where that is over ``limit`` bytes, the start of ``name``, a hash of
    all of it (two long names that start alike stay apart) and ``suffix``."""
    if _name_bytes(name + suffix) <= limit:
        return name + suffix
    digest = "-" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    kept = name
    while kept and _name_bytes(kept + digest + suffix) > limit:
        kept = kept[:-1]
    return kept + digest + suffix


def sibling_name(source_path: str) -> str:
    """``<stem>.fp16.safetensors`` for ``<stem>.safetensors``; ``<name>-fp16.safetensors`` otherwise.

    A source named without the suffix (``model``) must not share its sibling with
    ``model.safetensors`` beside it: the two would reconvert on every other load. A long
    name is shortened (``fitted``) so that its lock's and temp files' names fit too.
    """
    name = os.path.basename(source_path)
    if name.endswith(SAFETENSORS_SUFFIX):
        stem, suffix = name[: -len(SAFETENSORS_SUFFIX)], SIBLING_SUFFIX
    else:
        stem, suffix = name, UNSUFFIXED_SIBLING_SUFFIX
    if _name_bytes(stem + suffix) <= MAX_SIBLING_NAME:
        return stem + suffix
    # A shortened name ends as no natural one can: a file named like the short form of a long
    # name (a legal, shorter name) never shares its sibling with it.
    return fitted(stem, SHORTENED_SUFFIXES[suffix], MAX_SIBLING_NAME)


# What follows the prefix in a name sa3loader gave a temp file: <pid>-<8 hex> (being written),
# written-<boot id>-<inf>-<zero>-<pid>-<8 hex> (all written, not yet published); an older
# version's `convert --verify` wrote verify-<pid>, through verify-<pid>.incomplete-<pid>-<8 hex>.
# Only a name of exactly this shape is sa3loader's: a user's file that merely starts like
# one (``a.fp16.safetensors.incomplete-epoch3.safetensors``) is never taken for a temp file.
# The group is the pid of the process that wrote it.
INCOMPLETE_TAIL = re.compile(
    r"(?:written-[0-9a-f]+-[0-9]+-[0-9]+-)?([0-9]+)-[0-9a-f]{8}"
    r"|verify-([0-9]+)(?:\.incomplete-[0-9]+-[0-9a-f]{8})?"
)


def temp_files_of(dest: str) -> list[str]:
    """The temp files sa3loader named for ``dest`` that are there, by the exact shape of their names."""
    prefix = incomplete_prefix(dest)
    return sorted(
        path
        for path in glob.glob(glob.escape(prefix) + "*")
        if INCOMPLETE_TAIL.fullmatch(path[len(prefix) :])
    )


# The tail a writer's pid is read from: a temp file's, a `convert DIR` staging or set-aside output's.
WRITER_TAIL = re.compile(r"([0-9]+)-[0-9a-f]{8}")


def left_by_a_gone_writer(path: str, dest: str) -> bool:
    """Whether ``path``, a temp file of ``dest`` (``INCOMPLETE_TAIL``), was written by a
    process of this host that no longer runs (a killed conversion's: nothing finishes it), and
    has been left unchanged since (``WRITER_QUIET_S``)."""
    match = INCOMPLETE_TAIL.fullmatch(path[len(incomplete_prefix(dest)) :])
    gone = match is not None and process_gone(int(match.group(1) or match.group(2)))
    return gone and quiet_for(path, WRITER_QUIET_S)


# How long a dead writer's temp file or staging folder must have been left unchanged before
# it is removed: its pid was judged in this pid namespace, and a writer in another (a container
# sharing the volume) may still be writing it, which changes it at least every few seconds.
WRITER_QUIET_S = 600.0


def quiet_for(path: str, seconds: float) -> bool:
    """Whether nothing at ``path`` (a file; a folder, and everything in it) changed in the last
    ``seconds`` (a time ahead of this clock: changed now)."""
    try:
        newest = os.lstat(path).st_mtime
        for root, dirs, files in os.walk(path):  # (nothing to walk for a file)
            for name in dirs + files:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    except OSError:  # gone or changing meanwhile: not quiet
        return False
    return time.time() - newest > seconds


# Linux's PID_MAX_LIMIT on 64-bit: no writer of this host had a larger pid.
PID_LIMIT = 1 << 22


def process_gone(pid: int) -> bool:
    """Whether a process of this host that had ``pid`` no longer runs. This one runs, and another
    user's (EPERM); a pid no kernel gives (0, above ``PID_LIMIT``) is no writer's: not gone."""
    if not 0 < pid <= PID_LIMIT or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: another user's process
        return False
    return False


def is_temp_name(name: str) -> bool:
    """Whether a file name has the shape of one sa3loader gives a temp file (of any sibling)."""
    head, infix, tail = name.rpartition(INCOMPLETE_INFIX)
    return bool(infix and head and INCOMPLETE_TAIL.fullmatch(tail))


def incomplete_prefix(dest: str) -> str:
    """What the temp files of ``dest`` are named from: ``<dest>.incomplete-``, shortened for a
    long name (a file converted in place)."""
    directory, name = os.path.split(dest)
    return os.path.join(directory, fitted(name, "", MAX_SIBLING_NAME)) + INCOMPLETE_INFIX


# Beside a checkpoint, sa3loader's files live in one hidden folder, as huggingface_hub keeps
# its local-dir metadata in .cache/huggingface/: no glob of the checkpoint's folder, no
# newest-file pick over its files, no `hf upload` of it (with this ignore pattern) sees them.
BESIDE_SUBDIR = os.path.join(".cache", "sa3loader")


def beside_dir(source_path: str) -> str:
    """The hidden folder beside a checkpoint that holds its sibling (``<folder>/.cache/sa3loader``)."""
    return os.path.join(os.path.dirname(os.path.abspath(source_path)), BESIDE_SUBDIR)


def beside_path(source_path: str) -> str:
    return os.path.join(beside_dir(source_path), sibling_name(source_path))


def legacy_beside_path(source_path: str) -> str:
    """Where older versions put the sibling (next to the checkpoint): still found, never written."""
    return os.path.join(os.path.dirname(os.path.abspath(source_path)), sibling_name(source_path))


def cache_path(cache_dir: str, source_path: str, real_source: str, blob: str | None = None) -> str:
    """Sibling location in the cache dir, keyed by the hub blob's content hash when the
    source is one (every copy of that blob shares it), else by the real file."""
    key = f"blob:{blob}" if blob is not None else real_source
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(cache_dir, SIBLINGS_SUBDIR, digest, sibling_name(source_path))


def at_sibling_place(path: str, cache_dir: str) -> bool:
    """Whether ``path`` has a sibling's name where only sa3loader writes siblings: a checkpoint
    folder's hidden ``.cache/sa3loader`` or ``<cache>/siblings/<key>``. A file next to a
    checkpoint (an older version's sibling, or your own ``convert --out``), a converted
    checkpoint, anything a row merely names: not, and so never deleted by a cache command or the cap.
    The cache dir named another way (a symlinked folder above it) is the cache dir: the folders
    are compared resolved too, so what a load wrote there is where it really is."""
    folder = os.path.dirname(path)
    siblings = os.path.join(cache_dir, SIBLINGS_SUBDIR)
    if os.path.islink(siblings):  # a link there leads out of the cache dir: no sibling's place
        return folder.endswith(os.sep + BESIDE_SUBDIR) and os.path.basename(path).endswith(SIBLING_SUFFIXES)
    return os.path.basename(path).endswith(SIBLING_SUFFIXES) and (
        folder.endswith(os.sep + BESIDE_SUBDIR)
        or os.path.dirname(folder) == siblings
        or os.path.realpath(os.path.dirname(folder)) == os.path.realpath(siblings)
    )


def in_cache_dir(path: str, cache_dir: str) -> bool:
    """Whether ``path`` is a sibling place of the cache dir (``<cache>/siblings/<key>/<name>``)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(path))) == cache_dir


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return _faults.fact("free_bytes", path, st.f_bavail * st.f_frsize)


# A file being written: <final name><INCOMPLETE_INFIX><pid>-<random>, renamed into place when done.
INCOMPLETE_INFIX = ".incomplete-"

LOCK_SUFFIX = ".lock"


PRIVATE_DIR_MODE = 0o700

CACHEDIR_TAG = "CACHEDIR.TAG"

CACHEDIR_TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by sa3loader.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


def create_cache_dir(path: str) -> None:
    """Make a cache dir's ``path`` (private, as every dir sa3loader creates) and tag the cache dir."""
    make_private_dirs(path)
    tag_cache_dir(os.path.dirname(path))


def tag_cache_dir(cache_dir: str) -> None:
    """Write a CACHEDIR.TAG, so backup tools skip gigabytes of siblings; best effort. Not in a
    folder that holds other files (a project folder given as the cache dir): backups would
    skip those too."""
    path = os.path.join(cache_dir, CACHEDIR_TAG)
    if os.path.exists(path):
        return
    try:
        if set(os.listdir(cache_dir)) - {INDEX_SUBDIR, SIBLINGS_SUBDIR}:
            return
        with open(path, "x", encoding="ascii") as f:
            f.write(CACHEDIR_TAG_TEXT)
    except OSError:
        pass  # a read-only or racing cache dir: the tag is a courtesy


def make_private_dirs(path: str) -> None:
    """``os.makedirs`` with mode 0700 for every dir it creates, as ``tempfile.mkdtemp`` does."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        make_private_dirs(parent)
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def make_beside_dirs(hidden: str) -> list[str]:
    """Create ``<folder>/.cache/sa3loader`` as readable as ``<folder>`` and never writable by
    others (a service user who reads the checkpoint reads its sibling); the dirs created.
    Best effort: a folder that cannot be created is reported by the room check after."""
    folder = os.path.dirname(os.path.dirname(hidden))
    try:
        folder_stat = os.stat(folder)
    except OSError:
        return []
    made = []
    for directory in (os.path.dirname(hidden), hidden):
        try:
            os.mkdir(directory, stat.S_IMODE(folder_stat.st_mode) & 0o755)
        except FileExistsError:
            continue
        except OSError:
            break
        with contextlib.suppress(OSError):  # the folder's group, which reads the checkpoint (else ours)
            os.chown(directory, -1, folder_stat.st_gid)
        made.append(directory)
    return made


def remove_if_empty(dirs: list[str]) -> None:
    """Remove the dirs ``make_beside_dirs`` made, deepest first, where nothing was put in them."""
    for directory in reversed(dirs):
        try:
            os.rmdir(directory)
        except OSError:
            return


def siblings_with_leftovers(cache_dir: str) -> set[str]:
    """Every sibling name under ``<cache>/siblings`` that has a lock or temp file beside it."""
    found = set()
    for directory, _, files in os.walk(os.path.join(cache_dir, SIBLINGS_SUBDIR)):
        for name in files:
            if name.endswith(LOCK_SUFFIX):
                found.add(os.path.join(directory, name[: -len(LOCK_SUFFIX)]))
            elif is_temp_name(name):
                found.add(os.path.join(directory, name.rpartition(INCOMPLETE_INFIX)[0]))
    return found


# What a cache command's removals leave empty, to remove too.
def _own_dir(path: str) -> bool:
    try:
        return os.lstat(path).st_uid == os.getuid()
    except OSError:
        return False


def emptied_cache_dirs(cache_dir: str, removals: list[Removal]) -> list[Removal]:
    """Dirs under ``<cache>/siblings`` that hold nothing once ``removals`` are gone, deepest first."""
    root = os.path.join(cache_dir, SIBLINGS_SUBDIR)
    going = {r.path for r in removals}
    empty: list[Removal] = []
    for directory, dirs, files in sorted(os.walk(root, topdown=False), reverse=True):
        # Not one at a lock's name (a run keeps what its lock guards), nor another user's.
        if directory == root or directory.endswith(LOCK_SUFFIX) or not _own_dir(directory):
            continue
        left = [f for f in files if os.path.join(directory, f) not in going]
        left += [d for d in dirs if os.path.join(directory, d) + os.sep not in going]
        if not left:
            empty.append(Removal(directory + os.sep, 0, "empty dir"))
            going.add(directory + os.sep)
    return empty


def emptied_beside_dirs(removals: list[Removal]) -> list[Removal]:
    """The hidden folders beside checkpoints (``.cache/sa3loader``, then ``.cache``) that
    ``removals`` empty, deepest first."""
    emptied: list[Removal] = []
    going = {r.path.rstrip(os.sep) for r in removals}
    for hidden in sorted({os.path.dirname(r.path) for r in removals if r.kind != "empty dir"}):
        if not hidden.endswith(os.sep + BESIDE_SUBDIR):
            continue
        for folder in (hidden, os.path.dirname(hidden)):
            with contextlib.suppress(OSError):
                if all(os.path.join(folder, name) in going for name in os.listdir(folder)):
                    emptied.append(Removal(folder + os.sep, 0, "empty dir"))
                    going.add(folder)
    return emptied


def canonical_path(path: str) -> str:
    """``path`` with its folder's symlinks resolved: one name per sibling, however it was reached."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def freed(removals: list[Removal]) -> list[Removal]:
    """``removals``, each file's bytes counted where removing it frees them: once, at its last
    name, where the plan removes every name linking it (a folder copied with ``cp -al``)."""
    names: dict[tuple[int, int], list[int]] = {}
    spelled = {canonical_path(r.path): i for i, r in enumerate(removals)}  # one index per name
    for i, r in enumerate(removals):
        with contextlib.suppress(OSError):
            st = os.lstat(r.path)
            if st.st_nlink > 1 and spelled[canonical_path(r.path)] == i:
                names.setdefault((st.st_dev, st.st_ino), []).append(i)
    out = list(removals)
    for (dev, ino), indices in names.items():
        with contextlib.suppress(OSError):
            st = os.lstat(removals[indices[-1]].path)
            if (st.st_dev, st.st_ino) == (dev, ino) and len(indices) == st.st_nlink:
                out[indices[-1]] = dataclasses.replace(removals[indices[-1]], bytes=st.st_size)
    return out
