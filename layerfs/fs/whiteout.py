"""Whiteout names and the rules about them, in one place.

A layer deletes ``NAME`` from the layers below it with an empty regular file
``.wh.NAME`` in the same directory, and hides every lower child of a
directory with ``DIR/.wh..wh..opq`` (FORMATS.md §7). Names starting with
``.wh..wh.`` are AUFS metadata (``.wh..wh.plnk`` holds AUFS hardlink stashes);
none of these names is ever visible in a merged tree, and a writable mount
refuses to create them, since a commit would turn such a file into a
whiteout.
"""

from __future__ import annotations

# The names themselves are the layer format's, shared with the tar indexer.
from layerfs.model.whiteout import AUFS_LINK_DIR as AUFS_LINK_DIR
from layerfs.model.whiteout import META_PREFIX as META_PREFIX
from layerfs.model.whiteout import OPAQUE as OPAQUE
from layerfs.model.whiteout import PREFIX as PREFIX


def is_reserved(name: bytes) -> bool:
    """True for every name a layer uses for whiteout bookkeeping (never visible)."""
    return name.startswith(PREFIX)


def is_whiteout(name: bytes) -> bool:
    """``.wh.NAME`` that deletes ``NAME`` (not the opaque marker, not AUFS metadata)."""
    return name.startswith(PREFIX) and not name.startswith(META_PREFIX) and len(name) > 4


def whited_out(name: bytes) -> bytes:
    """The name a whiteout entry removes: ``.wh.foo`` -> ``foo``."""
    return name[len(PREFIX) :]


def whiteout_for(name: bytes) -> bytes:
    """The whiteout entry name that removes ``name``: ``foo`` -> ``.wh.foo``."""
    return PREFIX + name


def in_aufs_link_dir(path: bytes) -> bool:
    """True for ``.wh..wh.plnk`` at the root and everything below it."""
    return path == AUFS_LINK_DIR or path.startswith(AUFS_LINK_DIR + b"/")
