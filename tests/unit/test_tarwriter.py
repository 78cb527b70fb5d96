"""layerfs.store.tarwriter: the header and the data range that export and commit write."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import pytest

from layerfs.store.tarindex import (
    BLOCKDEV,
    DIR,
    HARDLINK,
    REG,
    SYMLINK,
    Entry,
    index_tar,
    open_pax_writer,
)
from layerfs.store.tarwriter import DataRange, tar_info


def entry(path: bytes, kind: str, **fields: object) -> Entry:
    values: dict[str, object] = dict(mode=0o644, uid=0, gid=0, size=0, mtime_ns=0, offset=0)
    values.update(fields)
    return Entry(path, kind, **values)  # type: ignore[arg-type]


def test_entries_written_with_tar_info_index_back_to_the_same_entries() -> None:
    data = b"hello"
    written = [
        entry(b"", DIR, mode=0o700, mtime_ns=5_000_000_000),
        entry(b"d", DIR, mode=0o755, uid=1, gid=2),
        entry(
            b"d/f\xff",
            REG,
            size=len(data),
            mode=0o4755,
            mtime_ns=7_000_000_000,
            xattrs={"user.k": b"v\xff"},
        ),
        entry(b"d/h", HARDLINK, linkname=b"d/f\xff"),
        entry(b"s", SYMLINK, mode=0o777, linkname=b"../t\xfe"),
        entry(b"sda", BLOCKDEV, mode=0o660, devmajor=8, devminor=1),
    ]
    out = io.BytesIO()
    with open_pax_writer(out) as archive:
        for item in written:
            info = tar_info(item)
            body = io.BytesIO(data) if item.type == REG else None
            archive.addfile(info, body)
    read = index_tar(io.BytesIO(out.getvalue())).entries
    # Everything but the data offset, which only the tar just written can say.
    assert [dataclasses.replace(e, offset=0) for e in read] == written
    f = read[2]
    assert out.getvalue()[f.offset : f.offset + f.size] == data
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        assert {m.uname for m in tar.getmembers()} == {""}


def test_ranges_of_one_handle_read_in_turn_each_get_their_own_bytes() -> None:
    handle = io.BytesIO(b"0123456789")
    first, second = DataRange(handle, 2, 4), DataRange(handle, 7, 3)
    assert first.read(2) == b"23"
    assert second.read(2) == b"78"
    assert first.read() == b"45"
    assert second.read(10) == b"9"
    assert first.read() == b"" and second.read() == b""


@pytest.mark.parametrize("pad", [False, True])
def test_a_range_past_the_end_of_its_file_ends_early_or_is_padded(pad: bool) -> None:
    handle = io.BytesIO(b"abc")
    data = DataRange(handle, 1, 5, pad=pad)
    assert data.read() == (b"bc\0\0\0" if pad else b"bc")
    assert data.read() == b""
    assert not handle.closed


def test_an_owned_handle_is_closed_once_its_range_is_read() -> None:
    handle = io.BytesIO(b"abcdef")
    data = DataRange(handle, 0, 4, owned=True)
    assert data.read(3) == b"abc" and not handle.closed
    assert data.read(3) == b"d" and handle.closed


def test_a_cut_layer_tar_fails_the_tar_being_written() -> None:
    info = tar_info(entry(b"f", REG, size=10))
    with (
        pytest.raises(OSError, match="unexpected end of data"),
        open_pax_writer(io.BytesIO()) as archive,
    ):
        archive.addfile(info, DataRange(io.BytesIO(b"short"), 0, 10))
