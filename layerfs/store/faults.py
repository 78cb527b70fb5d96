"""Named fault points: steps of the store's commands where a test can make it die.

For tests only. ``LAYERFS_FAULT=NAME`` (or ``NAME:N`` for the N-th time the step
is reached in the process) makes the process kill itself with SIGKILL when it
reaches the named step, as a power cut or ``kill -9`` would stop it there.
``LAYERFS_FAULT_TRACE=FILE`` appends ``NAME N`` to FILE each time a step is
reached, so a test can list every step a command passes and kill it at each.
Without either variable :func:`fault` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "LAYERFS_FAULT"
TRACE_ENV = "LAYERFS_FAULT_TRACE"

POINTS: dict[str, str] = {
    "stage.layer-written": "a layer's tar is written and fsynced in tmp/, its index not yet",
    "stage.mid-index": "half of a layer's index is written in tmp/",
    "stage.done": "a layer is staged whole in tmp/, nothing published",
    "record.written": "the pending record of a publication is durable, nothing else changed",
    "publish.before-rename": "a staged layer or image node is fsynced, not yet renamed into place",
    "publish.after-rename": "a layer or image node was renamed into place, its directory not "
    "yet fsynced",
    "publish.between-image-and-tag": "an image's layers and nodes are in place, its tags not",
    "write.before-rename": "a metadata file (tags, layer info, a record) is written and fsynced "
    "in tmp/, not yet renamed over the old one",
    "write.after-rename": "a metadata file was renamed into place, its directory not yet fsynced",
    "publish.before-record-removal": "the whole publication is visible, its record not yet removed",
    "remove.after-untag": "an rmi removed the tags, not yet the images",
    "remove.mid-unlink": "an image node or layer was renamed away and is half deleted",
    "remove.between-image-and-layer": "an rmi removed an image node, not yet its layer",
    "gc.between-layers": "gc or fsck --repair removed one unused layer, not yet the next",
    "save.mid-output": "save wrote part of its output",
}

_counts: dict[str, int] = {}
_counts_pid = 0


def fault(name: str) -> None:
    """Reached step ``name``: die here if the environment asks for it."""
    spec = os.environ.get(FAULT_ENV)
    trace = os.environ.get(TRACE_ENV)
    if not spec and not trace:
        return
    global _counts_pid
    if _counts_pid != os.getpid():  # a forked child counts its own steps
        _counts.clear()
        _counts_pid = os.getpid()
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}")
    count = _counts[name] = _counts.get(name, 0) + 1
    if trace:
        fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{name} {count}\n".encode())
        finally:
            os.close(fd)
    if spec:
        target, _, nth = spec.partition(":")
        if target == name and count == (int(nth) if nth.isdigit() else 1):
            os.kill(os.getpid(), signal.SIGKILL)
