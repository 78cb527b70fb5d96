"""Hostile layer tars the store had not seen: what is refused, what Docker does, memory.

Each case says what Docker's extraction (moby/go-archive ``UnpackLayer`` on overlay2)
does with the same input and what layerfs does; docs/store-format.md keeps the list.
Memory is measured for the inputs made to exhaust it: the peak of tracemalloc for the
bounded ones, the peak RSS of a child process for a million entries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from layerfs.errors import FormatError, UnsafePathError
from layerfs.fs.union import MergedTree
from layerfs.store.store import Store
from layerfs.store.tarindex import DIR, REG, SYMLINK, IndexResult, index_tar
from tests.helpers import build_tar, tar_dir, tar_file, tar_hardlink, tar_symlink
from tests.hostile import Endless
from tests.unit.test_tarindex import END, file_bytes, pad, pax_header, raw_header

MiB = 1 << 20


def index(data: bytes) -> IndexResult:
    import io

    return index_tar(io.BytesIO(data))


def tree(*layers: bytes) -> MergedTree:
    return MergedTree.build([index(layer).entries for layer in layers])


def peak_of(work: Callable[[], object]) -> int:
    """Peak bytes allocated by Python while ``work`` runs."""
    tracemalloc.start()
    try:
        try:
            work()
        except FormatError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- names that resolve to the layer root ---------------------------------------------------


@pytest.mark.parametrize("name", [".", "./", "a/..", "./a/../."])
def test_a_directory_named_for_the_root_sets_the_root(name: str) -> None:
    # Docker: Clean(name) is ".", the entry's metadata is applied to the root directory.
    data = raw_header(name.encode(), b"5", mode=0o700) + END
    merged = tree(build_tar(tar_file("f")), data)
    assert [(e.path, e.type) for e in index(data).entries] == [(b"", DIR)]
    assert merged.table.mode[merged.table.resolve(b"")] & 0o7777 == 0o700


@pytest.mark.parametrize("name", [".", "a/..", "./a/.."])
def test_a_file_named_for_the_root_is_refused(name: str) -> None:
    # Docker would RemoveAll the root it extracts into and fail: refused here, up front.
    data = raw_header(name.encode(), b"0", 0) + END
    with pytest.raises(UnsafePathError, match="not a directory resolves to the root"):
        index(data)


# -- hardlinks ------------------------------------------------------------------------------


def test_a_hardlink_to_a_symlink_is_a_second_name_of_the_symlink() -> None:
    # Docker: link(2) of a symlink links the symlink itself (no AT_SYMLINK_FOLLOW).
    merged = tree(build_tar(tar_symlink("s", "/etc/passwd"), tar_hardlink("h", "s")))
    t = merged.table
    assert t.resolve(b"h") == t.resolve(b"s")
    assert t.kind(t.resolve(b"h")) == SYMLINK and t.targets[t.resolve(b"h")] == b"/etc/passwd"
    assert t.nlink[t.resolve(b"h")] == 2


@pytest.mark.parametrize("target", [".wh.gone", "d/.wh..wh..opq", "d/.wh.x"])
def test_a_hardlink_to_a_whiteout_is_refused(target: str) -> None:
    # Docker never creates whiteout files, so its link(2) fails: refused here, with a reason.
    data = build_tar(tar_dir("d"), tar_file(target), tar_hardlink("h", target))
    with pytest.raises(UnsafePathError, match="points to the whiteout"):
        index(data)


def test_a_hardlink_to_a_later_entry_or_another_layer_is_refused() -> None:
    # Docker: the target does not exist (yet) in the layer's directory: link(2) fails.
    with pytest.raises(UnsafePathError, match="not an earlier entry of this layer"):
        index(build_tar(tar_hardlink("h", "f"), tar_file("f", b"later")))
    lower = build_tar(tar_file("f", b"lower"))
    assert index(lower).entries
    with pytest.raises(UnsafePathError, match="not an earlier entry of this layer"):
        index(build_tar(tar_hardlink("h", "f")))  # "f" is only in the layer below


def test_a_hardlink_keeps_the_file_a_later_entry_replaces() -> None:
    # Docker: link(2) shares the inode; the later "a" replaces the name, not the inode.
    data = build_tar(tar_file("a", b"old"), tar_hardlink("b", "a"), tar_file("a", b"newer"))
    t = tree(data).table
    a, b = t.resolve(b"a"), t.resolve(b"b")
    assert a != b and t.size[a] == 5 and t.size[b] == 3
    old = index(data).entries[0]
    assert t.offset[b] == old.offset  # reads the first "a"'s bytes


def test_a_hardlink_into_a_directory_a_later_entry_replaced_is_refused() -> None:
    data = build_tar(
        tar_dir("d"), tar_file("d/f", b"x"), tar_file("d", b"now a file"), tar_dir("d"),
        tar_hardlink("h", "d/f"),
    )  # fmt: skip
    with pytest.raises(UnsafePathError, match="went with 'd' when a later entry replaced"):
        index(data)


# -- the same path twice: the last one wins, as in Docker -----------------------------------


def test_duplicate_files_the_last_wins() -> None:
    t = tree(build_tar(tar_file("a", b"1"), tar_file("./a", b"333"))).table
    assert t.size[t.resolve(b"a")] == 3


def test_a_file_over_a_directory_takes_its_subtree_away() -> None:
    # Docker: RemoveAll of the directory, then the file.
    t = tree(build_tar(tar_dir("d"), tar_file("d/x"), tar_file("d", b"file"))).table
    assert t.kind(t.resolve(b"d")) == REG and not t.resolve(b"d/x")


def test_a_directory_over_a_file_and_a_symlink_over_a_symlink() -> None:
    t = tree(
        build_tar(tar_file("d"), tar_dir("d"), tar_file("d/x"), tar_symlink("s", "1"),
                  tar_symlink("s", "2"))
    ).table  # fmt: skip
    assert t.is_dir(t.resolve(b"d")) and t.resolve(b"d/x")
    assert t.targets[t.resolve(b"s")] == b"2"


def test_entries_below_a_file_that_replaced_their_directory_are_refused() -> None:
    # Docker's MkdirAll of the parent fails on the file: so does layerfs, with the name.
    with pytest.raises(UnsafePathError, match="written through 'd'"):
        index(build_tar(tar_dir("d"), tar_file("d", b"f"), tar_file("d/x")))


def test_a_layer_with_duplicates_loads_and_verifies(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    data = build_tar(tar_file("a", b"1"), tar_hardlink("b", "a"), tar_file("a", b"22"))
    import io

    staged = store.layers.ingest(io.BytesIO(data))
    staged.publish()
    assert list(store.layers.verify(staged.diff_id)) == []


# -- numbers --------------------------------------------------------------------------------


def base256(value: int, width: int) -> bytes:
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


def test_a_base256_size_is_read() -> None:
    header = bytearray(raw_header(b"f", b"0", size_field=base256(5, 12)))
    data = bytes(header) + pad(b"12345") + END
    assert [(e.path, e.size) for e in index(data).entries] == [(b"f", 5)]


def test_a_base256_size_past_2_to_the_63_is_refused() -> None:
    data = raw_header(b"f", b"0", size_field=base256(1 << 80, 12)) + END
    with pytest.raises(FormatError, match=r"entry size \d+ is out of range"):
        index(data)


def _with_field(block: bytes, start: int, value: bytes) -> bytes:
    from tests.unit.test_tarindex import _rechecksum

    return _rechecksum(block[:start] + value + block[start + len(value) :])


@pytest.mark.parametrize(("start", "what"), [(108, "uid"), (116, "gid")])
def test_an_owner_above_2_to_the_32_is_refused(start: int, what: str) -> None:
    # Docker passes it to lchown(2), whose uid_t keeps the low 32 bits: 2^32 would be root.
    block = _with_field(raw_header(b"f", b"0"), start, base256((1 << 32) + 0, 8))
    with pytest.raises(FormatError, match=f"'f' has {what} 4294967296, out of range"):
        index(block + END)
    with pytest.raises(FormatError, match=f"has {what} 1099511627776"):
        index(pax_header({what.encode(): b"1099511627776"}) + file_bytes(b"f") + END)


def test_the_largest_owner_is_kept() -> None:
    block = _with_field(raw_header(b"f", b"0"), 108, base256((1 << 32) - 1, 8))
    assert index(block + END).entries[0].uid == (1 << 32) - 1


def test_a_device_number_out_of_range_is_refused() -> None:
    block = _with_field(raw_header(b"dev", b"3"), 329, base256(1 << 40, 8))
    with pytest.raises(FormatError, match="devmajor 1099511627776, out of range"):
        index(block + END)


def test_mtimes_past_the_year_2262_are_clamped() -> None:
    data = pax_header({b"mtime": b"99999999999999"}) + file_bytes(b"f") + END
    assert index(data).entries[0].mtime_ns == (1 << 63) - 1


# -- sizes made to exhaust memory -----------------------------------------------------------


def test_a_pax_record_of_1_gb_is_refused_before_it_is_read() -> None:
    # Go's archive/tar refuses special headers over 1 MiB the same way.
    stream = Endless(raw_header(b"././@PaxHeader", b"x", 1 << 30))
    with pytest.raises(FormatError, match="PAX header of 1073741824 bytes exceeds"):
        index_tar(stream)
    assert stream.served <= 2 * MiB
    assert peak_of(lambda: index_tar(Endless(raw_header(b"p", b"x", 1 << 30)))) < 4 * MiB


def test_a_pax_record_claiming_1_gb_inside_a_small_header_is_refused() -> None:
    data = raw_header(b"p", b"x", 64) + pad(b"1073741824 path=" + b"a" * 40 + b"\n") + END
    with pytest.raises(FormatError, match="record length out of range"):
        index(data)


@pytest.mark.parametrize("typeflag", [b"L", b"x"])
def test_a_name_of_10_mb_is_refused_in_bounded_memory(typeflag: bytes) -> None:
    # A GNU long name (Docker/Go: 1 MiB limit) or a PAX path record of 10 MB.
    size = 10 * MiB
    head = raw_header(b"././@LongLink", typeflag, size)
    if typeflag == b"x":
        head += b"%d path=" % size
    stream = Endless(head, b"n")
    with pytest.raises(FormatError, match="exceeds the"):
        index_tar(stream)
    assert stream.served <= 2 * MiB
    assert peak_of(lambda: index_tar(Endless(head, b"n"))) < 4 * MiB


def test_a_name_linux_cannot_create_is_refused() -> None:
    with pytest.raises(FormatError, match="has a name of 256 bytes; Linux allows 255"):
        index(build_tar(tar_file("d/" + "n" * 256)))
    with pytest.raises(FormatError, match="longer than the 4095 bytes Linux allows"):
        index(build_tar(tar_file("/".join(["n" * 200] * 21))))
    # A whiteout of a 255-byte name is 259 bytes long: fine.
    assert index(build_tar(tar_file(".wh." + "n" * 255))).entries


MILLION = 1_000_000
_CHILD = """
import json, resource, sys, time
from layerfs.store.layers import write_index
from layerfs.store.tarindex import index_tar
from tests.hostile import EmptyEntries

class Null:
    def write(self, data):
        return len(data)

start = time.monotonic()
result = index_tar(EmptyEntries(int(sys.argv[1])))
write_index(Null(), result)
print(json.dumps({"entries": len(result.entries), "tar": result.tar_size,
                  "seconds": time.monotonic() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_a_million_empty_entries_index_in_bounded_memory() -> None:
    # The 512 MB tar is made as it is read and written nowhere: what is measured is the
    # indexer and the index writer of a load, in a process of their own.
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(MILLION)],
        capture_output=True, check=True, cwd=root, timeout=600,
    )  # fmt: skip
    report = json.loads(result.stdout)
    print(f"a million empty entries: {report}")
    assert report["entries"] == MILLION and report["tar"] == MILLION * 512 + 1024
    # Measured ~400 MB: about 380 bytes per entry (its Entry and its path in the rules).
    assert report["peak_rss"] < 500 * MiB, report
