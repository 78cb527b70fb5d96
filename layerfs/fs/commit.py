"""``commit``: an upper directory's changes become a layer and an image on the mounted one.

The saved state of the upper (``upper.py``) is written as a layer tar with
``.wh.`` whiteouts and ``.wh..wh..opq`` markers, streamed through a pipe into
the store as the new layer of a new image whose parent is the mounted image, like
``docker commit``: ``copy(NewImageSource, StoreDestination)``, the path of every
image into the store (``transports/new_image.py``). No FUSE here.
"""

from __future__ import annotations

import os
import tarfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

from layerfs.copy import copy_new_image
from layerfs.errors import LayerfsError, MountError, UsageError
from layerfs.fs.upper import STATE_VERSION
from layerfs.model.changes import apply_changes
from layerfs.model.image import Image
from layerfs.model.reference import Reference
from layerfs.store import codec
from layerfs.store.rows import INDEX_COLUMNS, OFFSET, SIZE, SOURCE, Row
from layerfs.store.store import Store
from layerfs.store.tarindex import REG, Entry, open_pax_writer
from layerfs.store.tarwriter import DataRange, tar_info
from layerfs.transports.new_image import NewImage, NewImageSource


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
        raise MountError(
            f"upper {upper_dir.name!r} belongs to image "
            f"{str(state.get('image'))[:12]}, not {image_id[:12]}"
        )
    parent = store.graph.get(image_id)
    recipe = NewImage(
        base=image_id,
        comment=message,
        author=author,
        config=apply_changes(dict(parent.config), changes or []),
        created_by=created_by,
        references=[f"{ref.repository}:{ref.tag or 'latest'}"] if ref is not None else [],
    )
    with _LayerTar(state["rows"], upper_dir, store) as layer:
        what = f"commit of {upper_dir.name}"
        source = NewImageSource(store, recipe, layer, name=upper_dir.name, what=what, plain=True)
        return copy_new_image(source, command="commit")


class _LayerTar:
    """The layer tar of an upper's changes as a stream, written by a thread into a pipe.

    Its end is the writer's end: a read that finds the pipe closed waits for the writer,
    and raises the writer's error, if it failed, instead of returning a short tar.
    """

    def __init__(self, rows: Sequence[Row], directory: Path, store: Store) -> None:
        read_fd, write_fd = os.pipe()
        self._reader = open(read_fd, "rb")  # noqa: SIM115 - closed by close()
        self._failure: BaseException | None = None
        self._name = directory.name

        def produce() -> None:
            try:
                with open(write_fd, "wb") as out:
                    write_layer_tar(rows, directory, out, store.layers.open_tar)
            except BrokenPipeError:
                pass  # the reader stopped (its own error is the one to report)
            except BaseException as exc:
                self._failure = exc

        self._writer = threading.Thread(target=produce, name="commit-tar", daemon=True)
        self._writer.start()

    def read(self, size: int = -1) -> bytes:
        data = self._reader.read(size)
        if not data:
            self._writer.join()
            if self._failure is not None:
                error = self._failure
                if isinstance(error, LayerfsError):
                    raise error
                raise MountError(f"cannot commit upper {self._name!r}: {error}") from error
        return data

    def close(self) -> None:
        self._reader.close()  # a writer still writing gets EPIPE and stops
        self._writer.join()

    def __enter__(self) -> BinaryIO:
        return cast(BinaryIO, self)  # it reads as a binary stream, which is all ingest asks

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the saved state and its layer tar -------------------------------------------------------


def read_state(directory: Path) -> dict[str, Any]:
    """The saved state of an upper directory (see :meth:`Upper.save`)."""
    path = directory / "state"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MountError(f"upper {directory.name!r} has no saved state") from None
    doc = codec.unpack(data, what=f"upper state {path}")
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise MountError(f"upper {directory.name!r}: unknown state format")
    return doc


def write_layer_tar(
    rows: Sequence[Row], directory: Path, out: BinaryIO, open_layer: Callable[[str], BinaryIO]
) -> int:
    """Write the changes as a layer tar (PAX, Docker's conventions); returns entries written.

    ``open_layer(diff_id)`` opens a lower layer tar for files whose data was
    never copied up (a chmod, a rename).
    """
    layers: dict[str, BinaryIO] = {}
    count = 0
    try:
        with open_pax_writer(out) as archive:
            for row in rows:
                entry = Entry.from_row(row[:INDEX_COLUMNS])
                info = tar_info(entry)
                info.mtime = max(info.mtime, 0)  # a commit writes no time before 1970
                if entry.type == REG and entry.size:
                    archive.addfile(info, _data(row, directory, layers, open_layer))
                else:
                    archive.addfile(info)
                count += 1
    except tarfile.TarError as exc:
        raise LayerfsError(f"cannot write the layer tar: {exc}") from exc
    finally:
        for handle in layers.values():
            handle.close()
    return count


def _data(
    row: Row, directory: Path, layers: dict[str, BinaryIO], open_layer: Callable[[str], BinaryIO]
) -> DataRange:
    """A file's data: its upper data file, or its range of a lower layer tar."""
    source = row[SOURCE]
    if source is None:
        handle: BinaryIO = open(directory / "data" / str(row[OFFSET]), "rb")  # noqa: SIM115
        return DataRange(handle, 0, row[SIZE], pad=True, owned=True)
    if source not in layers:
        layers[source] = open_layer(source)
    return DataRange(layers[source], row[OFFSET], row[SIZE], pad=True)
