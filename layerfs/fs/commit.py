"""``commit``: an upper directory's changes become a layer and an image on the mounted one.

The saved state of the upper (``upper.py``) is written as a layer tar with
``.wh.`` whiteouts and ``.wh..wh..opq`` markers, streamed through a pipe into
the store's ingest (hashed and indexed in the same pass, as any layer), and
registered with ``Graph.create`` whose parent is the mounted image, like
``docker commit``. No pyfuse3 here.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from layerfs.errors import LayerfsError, MountError, UsageError
from layerfs.fs.upper import read_state, write_layer_tar
from layerfs.model.changes import apply_changes
from layerfs.model.image import Image
from layerfs.model.reference import Reference
from layerfs.store.store import Store


def commit_upper(
    store: Store,
    upper_dir: Path,
    image_id: str,
    reference: str | None = None,
    *,
    message: str = "",
    author: str = "",
    changes: list[str] | None = None,
    created_by: str = "",
) -> tuple[Image, str | None]:
    """Commit the saved state of ``upper_dir`` on top of ``image_id``.

    Returns the new image and the rename message of the tag, if a tag moved.
    """
    ref = Reference.parse(reference) if reference else None
    if ref is not None and ref.digest:
        raise UsageError(f"cannot commit as {reference!r}: a digest cannot be a tag")
    state = read_state(upper_dir)
    if state.get("image") != image_id:
        raise MountError(f"upper {upper_dir.name!r} belongs to image "
                         f"{str(state.get('image'))[:12]}, not {image_id[:12]}")
    parent = store.graph.get(image_id)
    config = apply_changes(dict(parent.config), changes or [])
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with open(write_fd, "wb") as out:
                write_layer_tar(state["rows"], upper_dir, out, store.layers.open_tar)
        except BrokenPipeError:
            pass  # the consumer failed; its error is the one to report
        except BaseException as exc:
            failure.append(exc)

    writer = threading.Thread(target=produce, name="commit-tar", daemon=True)
    writer.start()
    try:
        with open(read_fd, "rb") as stream:
            staged = store.layers.ingest(stream, what=f"commit of {upper_dir.name}",
                                         decompress=False)
    finally:
        writer.join()
    if failure:
        staged.discard()
        error = failure[0]
        if isinstance(error, LayerfsError):
            raise error
        raise MountError(f"cannot commit upper {upper_dir.name!r}: {error}") from error
    try:
        image = store.graph.create(staged, parent=image_id, comment=message, author=author,
                                   config=config, created_by=created_by)
    except BaseException:
        staged.discard()
        raise
    rename = None
    if ref is not None:
        rename = store.tags.tag(ref.repository, ref.tag or "latest", image.id, force=True)
    return image, rename
