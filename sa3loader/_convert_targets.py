"""Where a conversion may write: never over its source (nor a folder holding it, nor into the
folder it copies), never into a Hugging Face hub cache, in place only a file of yours (root:
anyone's, given back to them)."""

from __future__ import annotations

import contextlib
import os
import stat

from ._places import in_hf_hub_cache, in_hub_repo
from .errors import ConfigError, HubCacheError, HubSymlinkError

HUB_HARM = {
    True: "its blobs would no longer hold what their content hashes name",
    False: "huggingface_hub would list the output as a revision that does not exist",
}


def in_place_target(path: str, within: str | None = None) -> str:
    """The file a conversion in place replaces: ``path``, or the file its symlink points to
    (inside ``within``, a directory converted: one outside is not what was asked for). Never
    a hub's, nor another user's (but as root, who gives it back to them)."""
    if os.path.islink(path) and in_hf_hub_cache(path):
        raise HubSymlinkError(
            f"{path} is a Hugging Face hub cache symlink; converting in place would break the "
            "hub's cache. Convert a copy (--out) or let loads keep their sibling in the cache dir.",
            filename=path,
        )
    if not os.path.islink(path) and in_hub_repo(os.path.dirname(os.path.abspath(path))):  # files, not links
        raise HubCacheError(
            f"{path} is in a Hugging Face hub cache, which sa3loader never writes into "
            f"({HUB_HARM[True]}). Convert a copy (--out) outside it.",
            filename=path,
        )
    real = os.path.realpath(path)
    folder = os.path.realpath(within) if within is not None else None
    if folder is not None and os.path.commonpath([real, folder]) != folder:
        raise ConfigError(
            f"{path} links to {real}, outside {within}: converting the folder in place would replace "
            "that file. Convert it by its own name, or a copy (--out).",
            filename=path,
        )
    owner = os.stat(real).st_uid
    if owner != os.geteuid() and os.geteuid() != 0:
        raise ConfigError(f"{path} is another user's (uid {owner}): not replaced in place", filename=path)
    return real if os.path.islink(path) else path


def refuse_output_over_source(src: str, out: str) -> None:
    """An output that is the source, a directory holding it, or (a folder's) one inside it:
    ``--force`` replaces the whole output, so the source (for a parent, all beside it; inside,
    what a run finds there, which the walk leaves out) would be deleted."""
    holder = os.path.dirname(os.path.abspath(out))
    while not os.path.isdir(holder) and os.path.dirname(holder) != holder:
        holder = os.path.dirname(holder)  # the nearest folder the output's entry would be in
    if (os.path.isdir(src) and _in_tree(holder, src)) or _reaches(out, os.path.realpath(src)):
        raise ConfigError(
            f"--out {out} is {src}, holds it or is inside it: writing there would delete the "
            "source. Give another --out, or convert in place with --in-place.",
            filename=out,
        )


def _reaches(out: str, real_src: str) -> bool:
    """Whether ``out`` names the source's own entry or a directory above it, by device and inode
    (through a symlink or a bind mount too: no comparison of path strings sees the latter). A
    hard link in another directory is another entry: replacing it leaves the source where it is.
    An output not there yet is neither."""
    try:
        target = os.stat(out)
    except OSError:
        return False
    if not stat.S_ISDIR(target.st_mode):  # the same name in the same directory
        real_out = os.path.realpath(out)
        same_name = os.path.basename(real_out) == os.path.basename(real_src)
        return same_name and _same_file(os.path.dirname(real_out), os.path.dirname(real_src))
    path = real_src
    while not _same_file(path, out):
        if os.path.dirname(path) == path:
            return False
        path = os.path.dirname(path)
    return True


def _in_tree(path: str, root: str) -> bool:
    """Whether the folder ``path`` is ``root`` or under it, by device and inode: through links,
    and through a bind mount of any folder of the tree, which no walk up from ``path`` meets."""
    tree, todo = set[tuple[int, int]](), [root]
    while todo:  # every folder of the tree, links followed (as the copy's walk), each once; one it
        with contextlib.suppress(OSError):  # cannot enter (a link loop, closed to you) the copy skips
            st = os.stat(at := todo.pop())
            if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in tree:
                tree.add((st.st_dev, st.st_ino))
                todo += [e.path for e in os.scandir(at) if e.is_dir(follow_symlinks=False) or e.is_symlink()]
    while (st := os.stat(path)) and (st.st_dev, st.st_ino) not in tree and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return (st.st_dev, st.st_ino) in tree


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_hub_output(out: str, directory: str) -> None:
    """An output inside a hub cache would be taken for one of its revisions."""
    if in_hub_repo(directory):
        raise HubCacheError(
            f"{out} is inside a Hugging Face hub cache, which sa3loader never writes into "
            f"({HUB_HARM[False]}). Pick an --out outside it.",
            filename=out,
        )
