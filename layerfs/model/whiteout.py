"""The whiteout names of the layer format (FORMATS.md §7), for every module that reads them.

A layer deletes ``NAME`` from the layers below with an empty file ``.wh.NAME`` and hides
every lower child of a directory with ``DIR/.wh..wh..opq``; names starting with
``.wh..wh.`` are AUFS metadata (``.wh..wh.plnk`` holds AUFS hardlink stashes). The tar
indexer (``layerfs.store.tarindex``) checks them, the union mount
(``layerfs.fs.whiteout``) applies them.
"""

from __future__ import annotations

PREFIX = b".wh."
OPAQUE = b".wh..wh..opq"
META_PREFIX = b".wh..wh."
AUFS_LINK_DIR = b".wh..wh.plnk"
