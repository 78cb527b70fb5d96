"""Tests for layerfs.store.tarindex and its header reader (tarheaders): the streaming layer
tar parser and its safety rules."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from layerfs.errors import ExpansionLimitError, FormatError, UnsafePathError
from layerfs.store import tarindex
from layerfs.store.tarheaders import (
    BLOCK,
    BLOCKDEV,
    CHAR,
    DIR,
    FIFO,
    HARDLINK,
    MAX_LONG_NAME,
    MAX_PAX_HEADER,
    REG,
    SYMLINK,
    normalize_path,
)
from layerfs.store.tarindex import Entry, index_tar
from tests.helpers import (
    build_tar,
    tar_dir,
    tar_file,
    tar_hardlink,
    tar_member,
    tar_symlink,
)

# -- hand-made tar pieces --------------------------------------------------------------------


def _rechecksum(block: bytes) -> bytes:
    """Recompute the ustar header checksum of a 512-byte block."""
    blanked = block[:148] + b" " * 8 + block[156:]
    return blanked[:148] + b"%06o\0 " % sum(blanked) + blanked[156:]


def raw_header(
    name: bytes,
    typeflag: bytes = b"0",
    size: int = 0,
    *,
    linkname: bytes = b"",
    mode: int = 0o644,
    size_field: bytes | None = None,
) -> bytes:
    """A ustar header with exact bytes in its name, type and size fields."""
    info = tarfile.TarInfo("x")
    info.mode = mode
    info.mtime = 1_700_000_000
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[0:100] = name.ljust(100, b"\0")[:100]
    block[156:157] = typeflag
    block[157:257] = linkname.ljust(100, b"\0")[:100]
    block[100:108] = b"%07o\0" % mode
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    return _rechecksum(bytes(block))


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax_record(key: bytes, value: bytes) -> bytes:
    """One ``"<len> key=value\\n"`` PAX record, its length counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pax_header(records: dict[bytes, bytes], typeflag: bytes = b"x") -> bytes:
    data = b"".join(pax_record(k, v) for k, v in records.items())
    return raw_header(b"PaxHeaders/x", typeflag, len(data)) + pad(data)


def file_bytes(name: bytes, data: bytes = b"", mode: int = 0o644) -> bytes:
    return raw_header(name, b"0", len(data), mode=mode) + pad(data)


END = bytes(2 * BLOCK)


def index(data: bytes) -> tarindex.IndexResult:
    return index_tar(io.BytesIO(data))


def paths(data: bytes) -> list[bytes]:
    return [e.path for e in index(data).entries]


def by_path(data: bytes) -> dict[bytes, Entry]:
    return {e.path: e for e in index(data).entries}


class CountingZeros:
    """A source of a given prefix followed by endless zeros; counts what was read."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        assert size > 0, "the indexer must never read an unbounded stream whole"
        start = self.read_bytes
        self.read_bytes += size
        head = self.prefix[start : start + size]
        return head + bytes(size - len(head))


# -- copy, hash, offsets ----------------------------------------------------------------------


def sample_tar() -> bytes:
    return build_tar(
        tar_dir("etc"),
        tar_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        tar_file("etc/empty", b""),
        tar_file("big", bytes(range(256)) * 50),
        tar_symlink("etc/mtab", "/proc/mounts"),
        tar_hardlink("etc/passwd-", "etc/passwd"),
    )


def test_copy_is_byte_exact_and_diff_id_covers_every_byte() -> None:
    data = sample_tar()
    assert len(data) % tarfile.RECORDSIZE == 0  # tarfile pads with zero blocks
    assert data.endswith(bytes(3 * BLOCK))  # so the stream goes on past the end marker
    sink = io.BytesIO()
    seen: list[int] = []
    result = index_tar(io.BytesIO(data), sink, progress=seen.append)
    assert sink.getvalue() == data
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert result.tar_size == len(data)
    assert sum(seen) == len(data)


def test_trailing_bytes_after_the_end_marker_are_copied_and_hashed() -> None:
    data = sample_tar() + bytes(3 * BLOCK) + b"trailing junk"
    sink = io.BytesIO()
    result = index_tar(io.BytesIO(data), sink)
    assert sink.getvalue() == data
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert result.tar_size == len(data)


def test_minimal_tar_of_two_zero_blocks_is_an_empty_layer() -> None:
    result = index(END)
    assert result.entries == []
    assert (
        result.diff_id == "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
    )
    assert result.content_size == 0


def test_small_source_reads_give_the_same_result() -> None:
    data = sample_tar()

    class Trickle(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            return super().read(7)

    assert index_tar(Trickle(data)).entries == index(data).entries


def test_offsets_match_tarfile_offset_data() -> None:
    data = build_tar(
        tar_file("a", b"x" * 1000),
        tar_file("l" * 150 + "/long", b"long name"),  # PAX path record before it
        tar_member("xattr", data=b"abc", pax={"SCHILY.xattr.user.k": "v"}),
        tar_file("z", b"z"),
    )
    ours = by_path(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [m for m in tar if m.isreg()]
        assert len(members) == 4
        for member in members:
            entry = ours[member.name.encode()]
            assert entry.offset == member.offset_data
            assert entry.size == member.size
            content = tar.extractfile(member).read()  # type: ignore[union-attr]
            assert data[entry.offset : entry.offset + entry.size] == content


def test_content_size_is_what_overlay2_measures() -> None:
    # Docker's layer Size: regular files' bytes plus symlink targets' lengths (lstat).
    result = index(sample_tar())
    assert result.content_size == len(b"root:x:0:0::/root:/bin/sh\n") + 256 * 50 + len(
        b"/proc/mounts"
    )


def test_entries_keep_tar_order_and_metadata() -> None:
    entries = index(sample_tar()).entries
    assert [e.path for e in entries] == [
        b"etc",
        b"etc/passwd",
        b"etc/empty",
        b"big",
        b"etc/mtab",
        b"etc/passwd-",
    ]
    etc, passwd, _, _, mtab, link = entries
    assert (etc.type, etc.mode) == (DIR, 0o755)
    assert (passwd.type, passwd.mode, passwd.size) == (REG, 0o644, 26)
    assert passwd.mtime_ns == 1_700_000_000 * 10**9
    assert (mtab.type, mtab.linkname, mtab.size) == (SYMLINK, b"/proc/mounts", 0)
    assert (link.type, link.linkname, link.size) == (HARDLINK, b"etc/passwd", 0)


def test_entry_row_round_trip() -> None:
    for entry in index(sample_tar()).entries:
        assert Entry.from_row(entry.to_row()) == entry


# -- header formats ---------------------------------------------------------------------------


def test_pax_long_names_and_link_names() -> None:
    long_dir = "d" * 120
    long_file = f"{long_dir}/" + "f" * 200
    long_target = "/" + "t" * 300
    data = build_tar(
        tar_dir(long_dir),
        tar_file(long_file, b"data"),
        tar_symlink("s", long_target),
        tar_hardlink("h" * 150, long_file),
    )
    entries = by_path(data)
    assert entries[long_file.encode()].size == 4
    assert entries[b"s"].linkname == long_target.encode()
    assert entries[b"h" * 150].linkname == long_file.encode()


def test_pax_xattrs_including_binary_capability() -> None:
    # A real security.capability value: binary, with NUL, newline and '=' bytes in it.
    capability = b"\x01\x00\x00\x02\x00\x20\x00\x00\n\x00=\x00\x00\x00\x00\xff"
    data = (
        pax_header(
            {
                b"SCHILY.xattr.security.capability": capability,
                b"SCHILY.xattr.user.comment": b"a=b c",
            }
        )
        + file_bytes(b"bin/ping", b"ELF", mode=0o755)
        + file_bytes(b"plain", b"")
        + END
    )
    entries = by_path(data)
    assert entries[b"bin/ping"].xattrs == {
        "security.capability": capability,
        "user.comment": b"a=b c",
    }
    assert entries[b"plain"].xattrs is None  # an 'x' header applies to one entry only


def test_pax_records_from_tarfile_are_read() -> None:
    data = build_tar(tar_member("f", data=b"1", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}))
    assert by_path(data)[b"f"].xattrs == {"trusted.overlay.opaque": b"y"}


def test_pax_mtime_with_fractions() -> None:
    data = pax_header({b"mtime": b"1700000000.123456789"}) + file_bytes(b"f") + END
    assert by_path(data)[b"f"].mtime_ns == 1_700_000_000_123_456_789
    data = pax_header({b"mtime": b"1.5"}) + file_bytes(b"f") + END
    assert by_path(data)[b"f"].mtime_ns == 1_500_000_000


@pytest.mark.parametrize(
    ("value", "expected_ns"),
    [
        (b"-1.5", -1_500_000_000),
        (b"-0.5", -500_000_000),  # a pre-epoch time less than a second before it
        (b"-2", -2_000_000_000),
        (b"0.000000001", 1),
        (b"3.1234567891", 3_123_456_789),  # beyond nanoseconds: truncated
    ],
)
def test_pax_mtime_signs_and_precision(value: bytes, expected_ns: int) -> None:
    data = pax_header({b"mtime": value}) + file_bytes(b"f") + END
    assert by_path(data)[b"f"].mtime_ns == expected_ns


def test_pax_uid_gid_beyond_octal_range() -> None:
    big = 3_000_000  # > 2**21 - 1, the largest 7-digit octal
    data = build_tar(tar_member("f", uid=big, gid=big + 1), fmt=tarfile.PAX_FORMAT)
    entry = by_path(data)[b"f"]
    assert (entry.uid, entry.gid) == (big, big + 1)


def test_gnu_base256_numbers() -> None:
    big = 3_000_000
    data = build_tar(
        tar_member("f", uid=big, gid=big + 1),
        tar_member("old", mtime=-1),
        fmt=tarfile.GNU_FORMAT,
    )
    raw_uid = data[108:116]
    assert raw_uid[0] & 0x80  # really written in base-256
    entries = by_path(data)
    assert (entries[b"f"].uid, entries[b"f"].gid) == (big, big + 1)
    assert entries[b"old"].mtime_ns == -1_000_000_000


def test_base256_size_field() -> None:
    size_field = b"\x80" + bytes(7) + (5).to_bytes(4, "big")
    data = raw_header(b"f", b"0", size_field=size_field) + pad(b"hello") + END
    entry = by_path(data)[b"f"]
    assert entry.size == 5
    assert data[entry.offset : entry.offset + 5] == b"hello"


def test_negative_base256_size_is_refused() -> None:
    data = raw_header(b"f", b"0", size_field=b"\xff" * 12) + END
    with pytest.raises(FormatError, match="negative entry size"):
        index(data)


def test_gnu_longname_and_longlink() -> None:
    long_file = "g" * 150 + "/" + "n" * 100
    long_target = "t" * 200
    data = build_tar(
        tar_file(long_file, b"x"),
        tar_symlink("sym", long_target),
        fmt=tarfile.GNU_FORMAT,
    )
    assert data[156:157] == b"L"  # the GNU long-name entry comes first
    entries = by_path(data)
    assert entries[long_file.encode()].size == 1
    assert entries[b"sym"].linkname == long_target.encode()


def test_ustar_prefix_field() -> None:
    prefix = "p" * 90
    name = f"{prefix}/" + "n" * 90
    data = build_tar(tar_file(name, b"x"), fmt=tarfile.USTAR_FORMAT)
    assert data[345 : 345 + len(prefix)] == prefix.encode()  # really split into prefix + name
    assert paths(data) == [name.encode()]


def test_gnu_magic_does_not_use_the_prefix_field() -> None:
    # GNU headers ("ustar  \0") keep other data at offset 345 (atime/ctime), not a prefix.
    header = bytearray(raw_header(b"name", b"0"))
    header[257:265] = b"ustar  \0"
    header[345:350] = b"junk\0"
    data = _rechecksum(bytes(header)) + END
    assert paths(data) == [b"name"]


def test_pax_global_header_applies_to_following_entries() -> None:
    data = pax_header({b"mtime": b"42"}, typeflag=b"g") + file_bytes(b"a") + file_bytes(b"b") + END
    entries = by_path(data)
    assert entries[b"a"].mtime_ns == entries[b"b"].mtime_ns == 42 * 10**9


def test_pax_path_overrides_the_header_name() -> None:
    data = pax_header({b"path": b"real/name"}) + file_bytes(b"short") + END
    assert paths(data) == [b"real/name"]


def test_pax_size_overrides_the_header_size() -> None:
    data = pax_header({b"size": b"3"}) + raw_header(b"f", b"0", 0) + pad(b"abc") + END
    entry = by_path(data)[b"f"]
    assert entry.size == 3
    assert data[entry.offset : entry.offset + 3] == b"abc"


@pytest.mark.parametrize(
    "records",
    [
        b"12 path=abc",  # no newline
        b"99 path=abc\n",  # length past the end
        b"x path=abc\n",  # length not a number
        b"11 pathabc\n",  # no '='
        b"nospace",
    ],
)
def test_malformed_pax_records_are_refused(records: bytes) -> None:
    data = raw_header(b"PaxHeaders/x", b"x", len(records)) + pad(records) + file_bytes(b"f") + END
    with pytest.raises(FormatError, match="malformed PAX header"):
        index(data)


@pytest.mark.parametrize(("field", "value"), [(b"uid", b"-1"), (b"gid", b"abc"), (b"size", b"")])
def test_bad_pax_numbers_are_refused(field: bytes, value: bytes) -> None:
    data = pax_header({field: value}) + file_bytes(b"f") + END
    with pytest.raises(FormatError, match="malformed PAX header"):
        index(data)


# -- entry types and modes --------------------------------------------------------------------


def test_every_entry_type_with_device_numbers() -> None:
    data = build_tar(
        tar_file("f", b"data"),
        tar_member("contiguous", b"7", data=b""),
        tar_dir("d"),
        tar_symlink("l", "f"),
        tar_hardlink("h", "f"),
        tar_member("c", tarfile.CHRTYPE, devmajor=1, devminor=3),
        tar_member("b", tarfile.BLKTYPE, devmajor=8, devminor=17),
        tar_member("p", tarfile.FIFOTYPE),
    )
    entries = by_path(data)
    assert {p.decode(): e.type for p, e in entries.items()} == {
        "f": REG,
        "contiguous": REG,
        "d": DIR,
        "l": SYMLINK,
        "h": HARDLINK,
        "c": CHAR,
        "b": BLOCKDEV,
        "p": FIFO,
    }
    assert (entries[b"c"].devmajor, entries[b"c"].devminor) == (1, 3)
    assert (entries[b"b"].devmajor, entries[b"b"].devminor) == (8, 17)
    assert (entries[b"p"].devmajor, entries[b"p"].devminor) == (0, 0)
    assert (entries[b"f"].devmajor, entries[b"f"].devminor) == (0, 0)


def test_v7_style_directory_marked_by_a_trailing_slash() -> None:
    data = raw_header(b"olddir/", b"\0") + END
    entries = index(data).entries
    assert [(e.path, e.type) for e in entries] == [(b"olddir", DIR)]


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o1777, 0o6711, 0o7777, 0o000, 0o600])
def test_mode_bits_including_setuid_setgid_sticky(mode: int) -> None:
    data = build_tar(tar_file("f", b"", mode=mode))
    assert by_path(data)[b"f"].mode == mode


def test_file_type_bits_in_the_mode_field_are_dropped() -> None:
    data = raw_header(b"f", b"0", mode=0o100755) + END
    assert by_path(data)[b"f"].mode == 0o755


def test_header_only_types_carry_no_data_even_with_a_size() -> None:
    # Go's archive/tar (Docker) and Python's tarfile ignore the size field of link,
    # directory, device and FIFO headers: the next header follows at once.
    for typeflag in (b"1", b"2", b"3", b"4", b"5", b"6"):
        linkname = b"target" if typeflag in (b"1", b"2") else b""
        data = (
            file_bytes(b"target", b"t")
            + raw_header(b"odd", typeflag, 512, linkname=linkname)
            + file_bytes(b"next", b"n")
            + END
        )
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert tar.getnames() == ["target", "odd", "next"]
        assert paths(data) == [b"target", b"odd", b"next"], typeflag
        assert by_path(data)[b"odd"].size == 0


def test_hardlink_to_symlink_and_to_a_hardlink() -> None:
    data = build_tar(
        tar_file("a", b"1"),
        tar_hardlink("b", "a"),
        tar_hardlink("c", "b"),
        tar_symlink("s", "a"),
        tar_hardlink("t", "s"),
    )
    entries = by_path(data)
    assert entries[b"c"].linkname == b"b"
    assert entries[b"t"].linkname == b"s"


# -- names ------------------------------------------------------------------------------------


def test_non_utf8_names_are_kept_as_bytes() -> None:
    latin1 = b"caf\xe9"
    data = (
        file_bytes(latin1, b"x")
        + pax_header({b"path": b"dir/\xff\xfe", b"hdrcharset": b"BINARY"})
        + file_bytes(b"ignored")
        + END
    )
    assert paths(data) == [latin1, b"dir/\xff\xfe"]


def test_non_utf8_name_from_tarfile() -> None:
    name = b"na\xefve".decode("utf-8", "surrogateescape")
    data = build_tar(tar_file(name, b"x"), fmt=tarfile.GNU_FORMAT)
    assert paths(data) == [b"na\xefve"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b"./a", b"a"),
        (b"./a/./b", b"a/b"),
        (b"a//b///c", b"a/b/c"),
        (b"a/../b", b"b"),
        (b"a/b/../../c", b"c"),
        (b"a/", b"a"),
        (b".", b""),
        (b"./", b""),
        (b"", b""),
    ],
)
def test_normalize_path(name: bytes, expected: bytes) -> None:
    assert normalize_path(name) == expected


@pytest.mark.parametrize("name", [b"..", b"../x", b"a/../../x", b"./../x", b"a/b/../../../x"])
def test_normalize_path_refuses_escapes(name: bytes) -> None:
    with pytest.raises(UnsafePathError, match="escapes the root"):
        normalize_path(name)


def test_dot_slash_prefixes_and_dotdot_are_normalised_in_a_tar() -> None:
    data = build_tar(
        tar_dir("./"),
        tar_dir("./a"),
        tar_file("./a/f", b"1"),
        tar_file("a/../b", b"2"),
        tar_hardlink("./c", "./a/./f"),
    )
    entries = by_path(data)
    assert list(entries) == [b"", b"a", b"a/f", b"b", b"c"]
    assert entries[b""].type == DIR
    assert entries[b"c"].linkname == b"a/f"


def test_names_only_differing_by_dot_slash_are_duplicates_and_the_last_wins() -> None:
    data = build_tar(tar_file("./a", b"1"), tar_file("a", b"22"))
    assert [(e.path, e.size) for e in index(data).entries] == [(b"a", 1), (b"a", 2)]


# -- refused inputs ---------------------------------------------------------------------------


def test_dotdot_escaping_the_root_is_refused() -> None:
    data = build_tar(tar_file("../evil", b"x"))
    with pytest.raises(UnsafePathError, match=r"'\.\./evil' escapes the root with '\.\.'"):
        index(data)


def test_dotdot_escaping_after_descending_is_refused() -> None:
    data = build_tar(tar_dir("a"), tar_file("a/../../evil", b"x"))
    with pytest.raises(UnsafePathError, match="escapes the root"):
        index(data)


def test_absolute_names_lose_their_leading_slash_as_in_docker() -> None:
    data = file_bytes(b"/etc/passwd", b"x") + file_bytes(b"//etc//group", b"y") + END
    assert paths(data) == [b"etc/passwd", b"etc/group"]


def test_dotdot_above_the_root_of_an_absolute_name_is_still_refused() -> None:
    # Docker's filepath.Clean would make "/../x" into "/x"; layerfs refuses the climb.
    with pytest.raises(UnsafePathError, match="escapes the root"):
        index(file_bytes(b"/../etc/passwd", b"x") + END)


@pytest.mark.parametrize(
    ("name", "typeflag"),
    [(".", b"2"), ("./", b"2"), ("a/..", b"2"), ("./a/../", b"6"), ("a/..", b"0"), (".", b"0")],
)
def test_non_directory_resolving_to_the_root_is_refused(name: str, typeflag: bytes) -> None:
    # Written by hand: a "./" regular file would be read as an old-style directory.
    data = raw_header(name.encode(), typeflag, linkname=b"x") + END
    with pytest.raises(UnsafePathError, match="not a directory resolves to the root"):
        index(data)


def test_root_directory_entry_is_fine() -> None:
    data = build_tar(tar_dir("."), tar_dir("./"))
    entries = index(data).entries
    assert [(e.path, e.type) for e in entries] == [(b"", DIR)]


def test_writing_through_a_symlink_of_the_same_layer_is_refused() -> None:
    data = build_tar(tar_symlink("etc", "/host/etc"), tar_file("etc/passwd", b"pwned"))
    with pytest.raises(
        UnsafePathError,
        match="'etc/passwd' would be written through 'etc', which is not a directory",
    ):
        index(data)


def test_writing_through_a_deeper_symlink_is_refused() -> None:
    data = build_tar(
        tar_dir("a"), tar_symlink("a/b", "../../.."), tar_dir("a/b/c"), tar_file("a/b/c/d")
    )
    with pytest.raises(UnsafePathError, match="written through 'a/b'"):
        index(data)


def test_writing_through_a_file_of_the_same_layer_is_refused() -> None:
    data = build_tar(tar_file("f", b"x"), tar_file("f/child", b"y"))
    with pytest.raises(UnsafePathError, match="written through 'f'"):
        index(data)


def test_writing_through_a_hardlink_of_the_same_layer_is_refused() -> None:
    data = build_tar(tar_file("f", b"x"), tar_hardlink("h", "f"), tar_file("h/x"))
    with pytest.raises(UnsafePathError, match="written through 'h'"):
        index(data)


def test_child_of_a_directory_from_a_lower_layer_is_fine() -> None:
    # "usr" is not in this layer at all: it may be a directory below, which is allowed.
    assert paths(build_tar(tar_file("usr/bin/x", b""))) == [b"usr/bin/x"]


def test_hardlink_to_a_later_entry_is_refused() -> None:
    data = build_tar(tar_hardlink("link", "target"), tar_file("target", b"x"))
    with pytest.raises(
        UnsafePathError,
        match="hardlink 'link' points to 'target', which is not an earlier entry of this layer",
    ):
        index(data)


def test_hardlink_to_a_path_outside_the_layer_is_refused() -> None:
    data = build_tar(tar_hardlink("link", "etc/shadow"))
    with pytest.raises(UnsafePathError, match="not an earlier entry of this layer"):
        index(data)


def test_hardlink_escaping_the_root_is_refused() -> None:
    data = build_tar(tar_file("a"), tar_hardlink("link", "../../etc/shadow"))
    with pytest.raises(UnsafePathError, match="escapes the root"):
        index(data)


def test_hardlink_with_an_absolute_target_names_an_entry_of_the_layer() -> None:
    # Docker links to filepath.Join(root, target): "/etc/shadow" is the layer's own.
    data = build_tar(tar_file("etc/shadow"), tar_hardlink("link", "/etc/shadow"))
    assert by_path(data)[b"link"].linkname == b"etc/shadow"
    with pytest.raises(UnsafePathError, match="not an earlier entry"):
        index(build_tar(tar_hardlink("link", "/etc/shadow")))


def test_hardlink_to_a_directory_is_refused() -> None:
    data = build_tar(tar_dir("d"), tar_hardlink("link", "d"))
    with pytest.raises(UnsafePathError, match="hardlink 'link' points to a directory"):
        index(data)


def test_hardlink_to_the_root_is_refused() -> None:
    data = build_tar(tar_dir("./"), tar_hardlink("link", "."))
    with pytest.raises(UnsafePathError, match="points to a directory"):
        index(data)


def test_hardlink_to_itself_is_refused() -> None:
    data = build_tar(tar_hardlink("self", "self"))
    with pytest.raises(UnsafePathError, match="hardlink 'self' points to itself"):
        index(data)


def test_hardlink_to_itself_after_a_file_of_that_name_is_refused() -> None:
    data = build_tar(tar_file("self", b"x"), tar_hardlink("self", "./self"))
    with pytest.raises(UnsafePathError, match="points to itself"):
        index(data)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (tar_file("a", b"1"), tar_file("a", b"2")),
        (tar_dir("a"), tar_file("a", b"2")),
        (tar_file("a", b"1"), tar_dir("a")),
        (tar_symlink("a", "x"), tar_symlink("a", "y")),
        (tar_file("x"), tar_file("x/../x")),
    ],
)
def test_duplicate_entries_are_kept_in_order_for_the_last_to_win(
    first: tuple[tarfile.TarInfo, bytes], second: tuple[tarfile.TarInfo, bytes]
) -> None:
    entries = index(build_tar(first, second)).entries
    assert [e.path for e in entries] == [b"a", b"a"] or [e.path for e in entries] == [b"x", b"x"]
    assert entries[1].type == (DIR if second[0].isdir() else SYMLINK if second[0].issym() else REG)


def test_repeated_directory_entries_are_accepted_and_the_last_wins() -> None:
    data = build_tar(
        tar_dir("d", 0o700),
        tar_file("d/f", b"x"),
        tar_dir("./d/", 0o750),
        tar_file("g", b"y"),
    )
    entries = index(data).entries
    assert [e.path for e in entries] == [b"d", b"d/f", b"g"]  # keeps its first position
    assert entries[0].mode == 0o750


@pytest.mark.parametrize("name", [".wh.", "dir/.wh."])
def test_bare_whiteout_is_refused(name: str) -> None:
    with pytest.raises(FormatError, match=r"bare whiteout '\.wh\.'"):
        index(build_tar(tar_file(name)))


def test_whiteouts_and_opaque_markers_are_kept_as_plain_entries() -> None:
    data = build_tar(tar_dir("d"), tar_file("d/.wh..wh..opq"), tar_file(".wh.gone"))
    assert paths(data) == [b"d", b"d/.wh..wh..opq", b".wh.gone"]


def test_huge_pax_header_is_refused_without_being_read() -> None:
    source = CountingZeros(raw_header(b"PaxHeaders/x", b"x", 1 << 31))
    with pytest.raises(FormatError, match=f"PAX header of {1 << 31} bytes exceeds the"):
        index_tar(source)
    assert source.read_bytes <= 2 * (1 << 20)


def test_pax_header_just_over_the_limit_is_refused() -> None:
    source = CountingZeros(raw_header(b"PaxHeaders/x", b"g", MAX_PAX_HEADER + 1))
    with pytest.raises(FormatError, match="exceeds the 1048576 limit"):
        index_tar(source)


def test_large_pax_header_within_the_limit_is_accepted() -> None:
    value = b"v" * (MAX_PAX_HEADER - 100)
    data = pax_header({b"SCHILY.xattr.user.big": value}) + file_bytes(b"f") + END
    assert by_path(data)[b"f"].xattrs == {"user.big": value}


def test_huge_gnu_long_name_is_refused_without_being_read() -> None:
    for typeflag in (b"L", b"K"):
        source = CountingZeros(raw_header(b"././@LongLink", typeflag, 1 << 32))
        with pytest.raises(FormatError, match="GNU long name of 4294967296 bytes exceeds"):
            index_tar(source)
        assert source.read_bytes <= 2 * (1 << 20)


def test_gnu_long_name_at_the_limit_is_read_but_linux_allows_4095_bytes() -> None:
    name = b"n/" * ((MAX_LONG_NAME - 1) // 2)
    data = raw_header(b"././@LongLink", b"L", len(name) + 1) + pad(name + b"\0")
    with pytest.raises(FormatError, match="longer than the 4095 bytes Linux allows"):
        index(data + file_bytes(b"short") + END)
    name = name[:4094].rstrip(b"/") + b"x"  # 4094 bytes
    data = raw_header(b"././@LongLink", b"L", len(name) + 1) + pad(name + b"\0")
    assert paths(data + file_bytes(b"short") + END) == [name]


def test_gnu_sparse_entry_is_refused() -> None:
    data = raw_header(b"sparse", b"S", 0) + END
    with pytest.raises(FormatError, match="sparse tar entries are not supported"):
        index(data)


def test_pax_sparse_entry_is_refused() -> None:
    data = (
        pax_header({b"GNU.sparse.major": b"1", b"GNU.sparse.minor": b"0"})
        + file_bytes(b"sparse")
        + END
    )
    with pytest.raises(FormatError, match="sparse"):
        index(data)


@pytest.mark.parametrize("typeflag", [b"V", b"M", b"N", b"Z", b"A"])
def test_unsupported_entry_types_are_refused(typeflag: bytes) -> None:
    with pytest.raises(FormatError, match="unsupported tar entry type"):
        index(raw_header(b"x", typeflag) + END)


def test_truncated_in_the_middle_of_a_header() -> None:
    data = sample_tar()  # "etc" header at 0, then the "etc/passwd" header at 512
    with pytest.raises(FormatError, match="truncated tar: unexpected end of data in a header"):
        index(data[: BLOCK + 100])


def test_truncated_in_the_middle_of_the_data() -> None:
    data = build_tar(tar_file("f", b"x" * 2000))
    with pytest.raises(FormatError, match="truncated tar: unexpected end of data in entry data"):
        index(data[: BLOCK + 1000])


def test_truncated_in_the_middle_of_a_pax_header() -> None:
    data = pax_header({b"path": b"p" * 600}) + file_bytes(b"f") + END
    with pytest.raises(FormatError, match="truncated tar: unexpected end of data in a PAX"):
        index(data[: BLOCK + 100])


def test_missing_end_of_archive_marker() -> None:
    data = file_bytes(b"f", b"x" * 10)
    with pytest.raises(FormatError, match="end-of-archive marker is missing"):
        index(data)


def test_a_single_zero_block_ends_the_archive() -> None:
    # Go's archive/tar and tarfile both stop at the first zero block when the stream ends.
    data = file_bytes(b"f", b"x") + bytes(BLOCK)
    assert paths(data) == [b"f"]


def test_corrupt_checksum_in_a_later_header() -> None:
    data = bytearray(sample_tar())
    data[BLOCK + 5] ^= 0x01  # inside the name of the second header
    with pytest.raises(FormatError, match=f"corrupt tar: bad header checksum at offset {BLOCK}"):
        index(bytes(data))


def test_corrupt_checksum_in_the_first_header() -> None:
    data = bytearray(sample_tar())
    data[0] ^= 0x01
    with pytest.raises(FormatError, match=r"not a tar archive \(bad header checksum\)"):
        index(bytes(data))


def test_signed_checksum_is_accepted() -> None:
    # Some old tars summed the header as signed bytes; both sums are valid.
    header = bytearray(raw_header(b"caf\xe9", b"0"))
    blanked = bytes(header[:148]) + b" " * 8 + bytes(header[156:])
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    header[148:156] = b"%06o\0 " % signed
    assert paths(bytes(header) + END) == [b"caf\xe9"]


@pytest.mark.parametrize(
    "data",
    [
        b"this is not a tar archive at all\n" * 40,
        b"PK\x03\x04" + bytes(1020),  # a zip file
        b"\x7fELF" + bytes(100) + b"x" * 1000,
    ],
)
def test_non_tar_input_is_refused(data: bytes) -> None:
    with pytest.raises(FormatError, match="not a tar archive"):
        index(data)


def test_short_non_tar_input_is_refused() -> None:
    with pytest.raises(FormatError, match="not a tar archive: the input ends inside its first"):
        index(b"hello, world\n")


def test_empty_input_is_refused() -> None:
    with pytest.raises(FormatError, match="not a tar archive: the input is empty"):
        index(b"")


def test_corrupt_octal_field_is_refused() -> None:
    data = raw_header(b"f", b"0", size_field=b"12x4567\0\0\0\0\0") + END
    with pytest.raises(FormatError, match="bad size field"):
        index(data)


@pytest.mark.parametrize("good_bytes", [0, BLOCK, 2 * BLOCK + 100])
def test_errors_of_the_source_are_not_taken_for_the_end_of_the_tar(good_bytes: int) -> None:
    # A decompressor below the indexer fails with its own FormatError (a bomb, a cut
    # stream); that error must come out, not "the input is empty" or "truncated tar".
    data = sample_tar()

    class Failing:
        def __init__(self) -> None:
            self.pos = 0

        def read(self, size: int = -1) -> bytes:
            if self.pos >= good_bytes:
                raise ExpansionLimitError("layer: decompressed data grew past 2x")
            chunk = data[self.pos : min(good_bytes, self.pos + size)]
            self.pos += len(chunk)
            return chunk

    with pytest.raises(ExpansionLimitError, match="grew past 2x"):
        index_tar(Failing())


@pytest.mark.parametrize("typeflag", [b"x", b"g"])
def test_pax_records_split_over_many_headers_are_bounded_too(typeflag: bytes) -> None:
    # Each header is under the limit, but their records pile up for one entry (or, for
    # global headers, for the whole archive): the total is held to the same limit.
    chunk = MAX_PAX_HEADER // 3
    headers = b"".join(
        pax_header({b"SCHILY.xattr.user.k%d" % n: b"v" * chunk}, typeflag=typeflag)
        for n in range(4)
    )
    with pytest.raises(FormatError, match="PAX records of more than 1048576 bytes"):
        index(headers + file_bytes(b"f") + END)


def test_repeated_pax_keys_do_not_count_twice() -> None:
    value = b"v" * (MAX_PAX_HEADER // 3)
    headers = b"".join(
        pax_header({b"SCHILY.xattr.user.same": value}, typeflag=b"g") for _ in range(5)
    )
    assert by_path(headers + file_bytes(b"f") + END)[b"f"].xattrs == {"user.same": value}
