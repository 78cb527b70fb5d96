"""layerfs.fs.posix through Upper: the POSIX rules of a writable layer, with no mount.

What each call changes (sizes, data files, times, link counts, mode bits, xattrs) is
checked on an Upper over a real image in a store in ``tmp_path``. The same rules are
checked against the host's file system through a real mount in
tests/integration/test_posix.py; these tests hold the model to them without FUSE,
including what pyfuse3 cannot ask for (fallocate, SEEK_DATA/SEEK_HOLE).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.fs.datafile import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from layerfs.fs.inodes import LAYER_UPPER, NAME_MAX, ROOT, InodeTable
from layerfs.fs.lower import from_store
from layerfs.fs.posix import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Caller,
    get_xattr,
    listed_xattrs,
)
from layerfs.fs.upper import Upper
from layerfs.store.rows import PATH
from layerfs.store.store import Store
from tests.helpers import build_tar, tar_member

MTIME = 1_500_000_000
ROOT_CALLER = Caller(0, 0, 0o022)
USER = Caller(1000, 1000, 0o022)
LOWER_DATA = bytes(range(256)) * 40


def _tar(*members: tuple[str, bytes, int, bytes, int]) -> bytes:
    """(name, type, mode, data or link target, uid) -> tar bytes."""
    return build_tar(
        *(
            tar_member(
                name,
                kind,
                data=data if kind == tarfile.REGTYPE else b"",
                linkname=data.decode() if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "",
                mode=mode,
                mtime=MTIME,
                uid=uid,
                gid=uid,
            )
            for name, kind, mode, data, uid in members
        )
    )


LAYER = _tar(
    ("dir", tarfile.DIRTYPE, 0o755, b"", 0),
    ("dir/lower", tarfile.REGTYPE, 0o644, LOWER_DATA, 0),
    ("dir/hard", tarfile.LNKTYPE, 0o644, b"dir/lower", 0),
    ("dir/suid", tarfile.REGTYPE, 0o6755, b"#!", 1000),
    ("sgid", tarfile.DIRTYPE, 0o2775, b"", 50),
    ("link", tarfile.SYMTYPE, 0o777, b"dir", 0),
    ("fifo", tarfile.FIFOTYPE, 0o644, b"", 0),
    ("L" * 255, tarfile.REGTYPE, 0o644, b"a name of NAME_MAX bytes", 0),
)


@pytest.fixture
def upper(tmp_path: Path) -> Iterator[Upper]:
    store = Store.open(tmp_path / "store")
    image = store.graph.create(store.layers.ingest(io.BytesIO(LAYER)), parent="")
    lower = from_store(store, image, image.id, init=False)
    tars = lower.open_tars()
    up = Upper.open(
        lower.tree,
        store.subdir("upper") / "u",
        image_id=image.id,
        diff_ids=lower.diff_ids,
        tars=tars,
        init=False,
        tmp_root=store.tmp,
    )
    yield up
    up.close()
    for fd in tars:
        os.close(fd)


def ino(up: Upper, path: str) -> int:
    found = up.table.resolve(path.encode())
    assert found, path
    return found


def data_of(up: Upper, number: int) -> bytes:
    return up.data_path(number).read_bytes()


def ctime_of(t: InodeTable, ino: int) -> int:
    """The ctime a stat reports: the table keeps one only where it differs from the mtime."""
    return t.ctime.get(ino, t.mtime[ino])


def times(up: Upper, node: int) -> tuple[int, int, int]:
    t = up.table
    return t.atime.get(node, t.mtime[node]), t.mtime[node], ctime_of(t, node)


def new_file(up: Upper, parent: int, name: bytes, data: bytes = b"") -> int:
    node = up.create_file(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, ROOT_CALLER)
    if data:
        up.write(node, 0, data)
    return node


def oserror(code: int) -> pytest.RaisesExc[OSError]:
    return pytest.raises(OSError, check=lambda e: e.errno == code)


# -- opening --------------------------------------------------------------------------------------


def test_o_trunc_truncates_an_upper_file_and_moves_mtime_and_ctime(upper: Upper) -> None:
    d = ino(upper, "dir")
    node = new_file(upper, d, b"f", b"hello world\n")
    upper.setattr(node, ROOT_CALLER, atime_ns=1, mtime_ns=2)
    upper.open_file(node, os.O_WRONLY | os.O_TRUNC, ROOT_CALLER)
    upper.write(node, 0, b"x\n")

    assert upper.table.size[node] == 2
    assert data_of(upper, upper.table.offset[node]) == b"x\n"
    atime, mtime, ctime = times(upper, node)
    assert atime == 1 and mtime > 2 and ctime >= mtime


def test_o_trunc_of_a_lower_file_copies_nothing(upper: Upper) -> None:
    node = ino(upper, "dir/lower")
    upper.open_file(node, os.O_RDONLY | os.O_TRUNC, ROOT_CALLER)  # O_RDONLY too, as Linux

    t = upper.table
    assert t.layer[node] == LAYER_UPPER and t.size[node] == 0
    assert data_of(upper, t.offset[node]) == b""
    assert t.mtime[node] > MTIME * 10**9
    assert t.nlink[node] == 2  # both names of the group see it
    assert upper.table.resolve(b"dir/hard") == node


def test_o_trunc_of_an_empty_file_still_moves_its_times(upper: Upper) -> None:
    node = new_file(upper, ROOT, b"empty")
    upper.setattr(node, ROOT_CALLER, atime_ns=5, mtime_ns=5)
    upper.open_file(node, os.O_WRONLY | os.O_TRUNC, ROOT_CALLER)
    assert upper.table.mtime[node] > 5


def test_open_refuses_what_the_inode_cannot_be(upper: Upper) -> None:
    with oserror(errno.ENOTDIR):
        upper.open_file(ino(upper, "dir/lower"), os.O_RDONLY | os.O_DIRECTORY, ROOT_CALLER)
    with oserror(errno.EISDIR):
        upper.open_file(ino(upper, "dir"), os.O_WRONLY, ROOT_CALLER)
    with oserror(errno.EISDIR):
        upper.open_file(ino(upper, "dir"), os.O_RDONLY | os.O_TRUNC, ROOT_CALLER)
    with oserror(errno.ELOOP):
        upper.open_file(ino(upper, "link"), os.O_RDONLY, ROOT_CALLER)
    fifo = ino(upper, "fifo")
    before = times(upper, fifo)
    upper.open_file(fifo, os.O_WRONLY | os.O_TRUNC, ROOT_CALLER)  # O_TRUNC is for files
    assert times(upper, fifo) == before
    upper.open_file(ino(upper, "dir"), os.O_RDONLY | os.O_DIRECTORY, ROOT_CALLER)


def test_create_file_opens_an_existing_name_unless_o_excl(upper: Upper) -> None:
    d = ino(upper, "dir")
    with oserror(errno.EEXIST):
        upper.create_file(d, b"lower", 0o600, os.O_CREAT | os.O_EXCL, ROOT_CALLER)
    node = upper.create_file(d, b"lower", 0o600, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, USER)
    assert node == ino(upper, "dir/lower")
    assert upper.table.size[node] == 0
    assert stat.S_IMODE(upper.table.mode[node]) == 0o644  # an existing file keeps its mode


# -- new entries: owner, group, mode -------------------------------------------------------


def test_new_entries_get_the_callers_ids_and_umask(upper: Upper) -> None:
    d = ino(upper, "dir")
    caller = Caller(1000, 1001, 0o077)
    made = upper.make_node(d, b"sub", stat.S_IFDIR | 0o777, caller)
    link = upper.make_node(d, b"sym", stat.S_IFLNK | 0o777, caller, target=b"sub")
    file = upper.create_file(d, b"f", 0o4777, os.O_CREAT, caller)

    t = upper.table
    assert (t.uid[made], t.gid[made], stat.S_IMODE(t.mode[made])) == (1000, 1001, 0o700)
    assert stat.S_IMODE(t.mode[link]) == 0o777
    assert stat.S_IMODE(t.mode[file]) == 0o4700


def test_a_setgid_directory_passes_its_group_and_its_setgid_on(upper: Upper) -> None:
    sg = ino(upper, "sgid")
    sub = upper.make_node(sg, b"sub", stat.S_IFDIR | 0o755, USER)
    file = upper.make_node(sg, b"f", stat.S_IFREG | 0o644, USER)
    t = upper.table
    assert t.gid[sub] == t.gid[file] == 50
    assert t.mode[sub] & stat.S_ISGID and not t.mode[file] & stat.S_ISGID


# -- attributes -----------------------------------------------------------------------------------


def test_setattr_keeps_atime_apart_and_moves_ctime(upper: Upper) -> None:
    node = ino(upper, "dir/lower")
    upper.setattr(node, ROOT_CALLER, atime_ns=111, mtime_ns=222)
    atime, mtime, ctime = times(upper, node)
    assert (atime, mtime) == (111, 222) and ctime > 222
    upper.setattr(node, ROOT_CALLER, mode=0o600)
    assert times(upper, node)[:2] == (111, 222) and times(upper, node)[2] > ctime
    upper.write(node, 0, b"w")  # data: mtime and ctime move, atime stays
    assert times(upper, node)[0] == 111 and times(upper, node)[1] > 222


def test_lower_and_new_entries_cost_no_time_side_table(upper: Upper) -> None:
    # atime and ctime equal to mtime are not stored: a merged tree pays nothing for them.
    assert upper.table.atime == {} and upper.table.ctime == {}
    node = new_file(upper, ROOT, b"f")
    assert node not in upper.table.atime and node not in upper.table.ctime
    assert ROOT in upper.table.atime  # its directory changed: the old atime is kept


def test_chown_clears_setuid_and_group_executable_setgid_of_files_only(upper: Upper) -> None:
    t = upper.table
    node = ino(upper, "dir/suid")
    upper.setattr(node, ROOT_CALLER, uid=1000)  # even root's chown, even to the same owner
    assert stat.S_IMODE(t.mode[node]) == 0o755
    upper.setattr(node, ROOT_CALLER, mode=0o6745)
    upper.setattr(node, ROOT_CALLER, gid=7)
    assert stat.S_IMODE(t.mode[node]) == 0o2745  # setgid without group-execute is locking
    sg = ino(upper, "sgid")
    upper.setattr(sg, ROOT_CALLER, uid=5)
    assert stat.S_IMODE(t.mode[sg]) == 0o2775
    upper.setattr(node, ROOT_CALLER, mode=0o4755, uid=9)  # a mode sent along is wanted
    assert stat.S_IMODE(t.mode[node]) == 0o4755


def test_an_empty_setattr_drops_setid_and_moves_ctime(upper: Upper) -> None:
    # What the kernel sends before another user's write (HANDLE_KILLPRIV), and chown(-1, -1).
    node = ino(upper, "dir/suid")
    ctime = ctime_of(upper.table, node)
    upper.setattr(node, USER)
    assert stat.S_IMODE(upper.table.mode[node]) == 0o755
    assert ctime_of(upper.table, node) > ctime


def test_truncation_by_another_user_drops_setid_but_not_by_root(upper: Upper) -> None:
    node = ino(upper, "dir/suid")
    upper.setattr(node, ROOT_CALLER, size=1)
    assert stat.S_IMODE(upper.table.mode[node]) == 0o6755
    upper.setattr(node, USER, size=0)
    assert stat.S_IMODE(upper.table.mode[node]) == 0o755
    upper.setattr(node, ROOT_CALLER, mode=0o6755)
    upper.open_file(node, os.O_WRONLY | os.O_TRUNC, USER)
    assert stat.S_IMODE(upper.table.mode[node]) == 0o755


def test_write_drops_setid_when_told_and_an_empty_write_changes_nothing(upper: Upper) -> None:
    node = ino(upper, "dir/suid")
    before = times(upper, node)
    assert upper.write(node, 0, b"") == 0
    assert times(upper, node) == before and upper.table.layer[node] != LAYER_UPPER
    upper.write(node, 0, b"x", kill_privs=True)
    assert stat.S_IMODE(upper.table.mode[node]) == 0o755


def test_truncate_up_and_down(upper: Upper) -> None:
    t = upper.table
    node = ino(upper, "dir/lower")
    upper.setattr(node, ROOT_CALLER, size=100)  # copies up only what stays
    assert data_of(upper, t.offset[node]) == LOWER_DATA[:100]
    upper.setattr(node, ROOT_CALLER, size=5000)
    assert data_of(upper, t.offset[node]) == LOWER_DATA[:100] + bytes(4900)
    for path, code in (("dir", errno.EISDIR), ("fifo", errno.EINVAL)):
        with oserror(code):
            upper.setattr(ino(upper, path), ROOT_CALLER, size=0)
    with oserror(errno.EINVAL):
        upper.truncate(node, -1)


# -- names ----------------------------------------------------------------------------------------


def test_names_longer_than_name_max_are_refused(upper: Upper) -> None:
    d = ino(upper, "dir")
    node = ino(upper, "dir/lower")
    fine, long = b"n" * NAME_MAX, b"n" * (NAME_MAX + 1)
    upper.link(node, d, fine)
    for call in (
        lambda: upper.link(node, d, long),
        lambda: upper.create_file(d, long, 0o644, os.O_CREAT, ROOT_CALLER),
        lambda: upper.make_node(d, long, stat.S_IFDIR | 0o755, ROOT_CALLER),
        lambda: upper.rename(d, fine, d, long),
        lambda: upper.unlink(d, long),
        lambda: upper.rmdir(d, long),
        lambda: upper.table.lookup(d, long),
    ):
        with oserror(errno.ENAMETOOLONG):
            call()
    assert upper.table.lookup(ROOT, b"L" * NAME_MAX)
    with oserror(errno.ENAMETOOLONG):
        upper.make_node(d, b"s", stat.S_IFLNK | 0o777, ROOT_CALLER, target=b"t" * 4096)
    upper.make_node(d, b"s", stat.S_IFLNK | 0o777, ROOT_CALLER, target=b"t" * 4095)


def test_rename_over_a_hard_link_updates_the_group(upper: Upper) -> None:
    t = upper.table
    d = ino(upper, "dir")
    group = ino(upper, "dir/lower")
    other = new_file(upper, d, b"other", b"o")
    ctime = ctime_of(t, group)
    replaced = upper.rename(d, b"other", d, b"hard")
    assert replaced == 0  # the group lives on in dir/lower
    assert t.nlink[group] == 1 and ctime_of(t, group) > ctime
    assert t.resolve(b"dir/hard") == other


def test_unlink_of_a_group_member_moves_the_others_ctime(upper: Upper) -> None:
    t = upper.table
    group = ino(upper, "dir/lower")
    ctime = ctime_of(t, group)
    assert upper.unlink(ino(upper, "dir"), b"hard") == group
    assert t.nlink[group] == 1 and ctime_of(t, group) > ctime


def test_rename_flags(upper: Upper) -> None:
    t = upper.table
    d = ino(upper, "dir")
    lower, suid = ino(upper, "dir/lower"), ino(upper, "dir/suid")
    with oserror(errno.EEXIST):
        upper.rename(d, b"lower", d, b"suid", RENAME_NOREPLACE)
    for flags in (RENAME_NOREPLACE | RENAME_EXCHANGE, 4, 8):
        with oserror(errno.EINVAL):
            upper.rename(d, b"lower", d, b"suid", flags)
    with oserror(errno.ENOENT):
        upper.rename(d, b"lower", d, b"missing", RENAME_EXCHANGE)
    c1, c2 = ctime_of(t, lower), ctime_of(t, suid)
    upper.rename(d, b"lower", d, b"suid", RENAME_EXCHANGE)
    assert (t.resolve(b"dir/lower"), t.resolve(b"dir/suid")) == (suid, lower)
    assert ctime_of(t, lower) > c1 and ctime_of(t, suid) > c2
    upper.rename(d, b"suid", ROOT, b"moved", RENAME_NOREPLACE)
    assert t.resolve(b"moved") == lower


def test_two_names_of_one_inode_rename_to_nothing(upper: Upper) -> None:
    t = upper.table
    d = ino(upper, "dir")
    ctime = ctime_of(t, ino(upper, "dir/lower"))
    assert upper.rename(d, b"lower", d, b"hard") == 0
    assert t.resolve(b"dir/lower") and t.resolve(b"dir/hard")
    assert ctime_of(t, ino(upper, "dir/lower")) == ctime


def test_a_socket_over_a_lower_name_whites_it_out_in_the_rows(upper: Upper) -> None:
    d = ino(upper, "dir")
    upper.unlink(d, b"suid")
    upper.make_node(d, b"suid", stat.S_IFSOCK | 0o644, ROOT_CALLER)
    paths = [row[PATH] for row in upper.rows()]
    assert b"dir/.wh.suid" in paths and b"dir/suid" not in paths


# -- extended attributes --------------------------------------------------------------------------


def test_xattr_flags_namespaces_and_limits(upper: Upper) -> None:
    t = upper.table
    node = ino(upper, "link")  # any file type
    upper.set_xattr(node, "trusted.a", b"1", os.XATTR_CREATE)
    with oserror(errno.EEXIST):
        upper.set_xattr(node, "trusted.a", b"2", os.XATTR_CREATE)
    with oserror(errno.ENODATA):
        upper.set_xattr(node, "trusted.b", b"2", os.XATTR_REPLACE)
    upper.set_xattr(node, "trusted.a", b"2", os.XATTR_REPLACE)
    assert get_xattr(t, node, "trusted.a") == b"2"
    for name, code in (
        ("other.a", errno.EOPNOTSUPP),
        ("nodot", errno.EOPNOTSUPP),
        ("user.", errno.EINVAL),
        ("user." + "x" * 251, errno.ERANGE),
    ):
        with oserror(code):
            upper.set_xattr(node, name, b"v")
        with oserror(code):
            get_xattr(t, node, name)
    with oserror(errno.E2BIG):
        upper.set_xattr(node, "user.big", bytes(65537))
    with oserror(errno.ENODATA):
        get_xattr(t, node, "user.none")
    ctime = ctime_of(t, node)
    upper.set_xattr(node, "trusted.a", b"2")  # the same value: nothing changes (ext4)
    assert ctime_of(t, node) == ctime
    upper.remove_xattr(node, "trusted.a")
    with oserror(errno.ENODATA):
        upper.remove_xattr(node, "trusted.a")


def test_trusted_xattrs_are_listed_to_root_only(upper: Upper) -> None:
    node = ino(upper, "dir")
    upper.set_xattr(node, "trusted.t", b"1")
    upper.set_xattr(node, "user.u", b"2")
    assert sorted(listed_xattrs(upper.table, node, ROOT_CALLER)) == ["trusted.t", "user.u"]
    assert listed_xattrs(upper.table, node, USER) == ["user.u"]


# -- fallocate and holes (what pyfuse3 cannot ask for) ------------------------------------


def test_fallocate_modes_and_sizes(upper: Upper) -> None:
    t = upper.table
    node = ino(upper, "dir/lower")
    upper.fallocate(node, 0, 0, 20_000)  # copies up, then grows
    assert t.layer[node] == LAYER_UPPER and t.size[node] == 20_000
    assert data_of(upper, t.offset[node])[: len(LOWER_DATA)] == LOWER_DATA
    mtime = t.mtime[node]
    upper.fallocate(node, FALLOC_FL_KEEP_SIZE, 0, 50_000)
    assert t.size[node] == 20_000 and t.mtime[node] > mtime
    try:
        upper.fallocate(node, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    except OSError as exc:  # the store's file system may not punch holes
        assert exc.errno == errno.EOPNOTSUPP
    else:
        assert data_of(upper, t.offset[node])[:4096] == bytes(4096)
    for mode, offset, length, code in (
        (0, 0, 0, errno.EINVAL),
        (0, -1, 10, errno.EINVAL),
        (FALLOC_FL_PUNCH_HOLE, 0, 10, errno.EOPNOTSUPP),
    ):
        with oserror(code):
            upper.fallocate(node, mode, offset, length)
    with oserror(errno.EISDIR):
        upper.fallocate(ino(upper, "dir"), 0, 0, 1)


def test_seek_data_and_hole(upper: Upper) -> None:
    lower = ino(upper, "dir/lower")
    size = len(LOWER_DATA)
    assert upper.seek(lower, 10, os.SEEK_DATA) == 10  # a layer's data has no holes
    assert upper.seek(lower, 10, os.SEEK_HOLE) == size
    with oserror(errno.ENXIO):
        upper.seek(lower, size, os.SEEK_DATA)
    sparse = new_file(upper, ROOT, b"sparse")
    upper.write(sparse, 1 << 20, b"data")
    hole = upper.seek(sparse, 0, os.SEEK_HOLE)
    data = upper.seek(sparse, 0, os.SEEK_DATA)
    # A file system without holes reports the whole file as data; ext4 and tmpfs do not.
    assert (hole, data) in (((1 << 20) + 4, 0), (0, 1 << 20))
    with oserror(errno.ENXIO):
        upper.seek(sparse, (1 << 20) + 4, os.SEEK_DATA)
    with oserror(errno.EINVAL):
        upper.seek(sparse, 0, os.SEEK_SET)


def test_an_unnamed_file_lives_until_linked_and_o_excl_keeps_it_unnamed(upper: Upper) -> None:
    t = upper.table
    d = ino(upper, "sgid")
    mtime = t.mtime[d]
    node = upper.make_unnamed(d, 0o666, os.O_RDWR, Caller(1000, 1000, 0o022))
    assert t.nlink[node] == 0 and t.gid[node] == 50
    assert stat.S_IMODE(t.mode[node]) == 0o644 and t.mtime[d] == mtime
    upper.write(node, 0, b"made unnamed")
    upper.link(node, d, b"named")
    assert t.resolve(b"sgid/named") == node and t.nlink[node] == 1
    sealed = upper.make_unnamed(d, 0o600, os.O_RDWR | os.O_EXCL, ROOT_CALLER)
    with oserror(errno.ENOENT):
        upper.link(sealed, d, b"never")
