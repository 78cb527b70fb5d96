"""The pyfuse3 engine's handlers over layerfs.fs.operations and layerfs.fs.upper, no mount.

Layers are real tars ingested into a store in ``tmp_path``; the handlers run under
pytest-trio. A writable tree's changes are committed as a layer tar and the result is
compared with the tree the handlers showed.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pyfuse3 = pytest.importorskip("pyfuse3")

from layerfs.fs.commit import read_state, write_layer_tar  # noqa: E402
from layerfs.fs.inodes import ROOT  # noqa: E402
from layerfs.fs.lower import from_store  # noqa: E402
from layerfs.fs.operations import Operations as Core  # noqa: E402
from layerfs.fs.pyfuse3_engine import Pyfuse3Operations as Operations  # noqa: E402
from layerfs.fs.union import MergedTree  # noqa: E402
from layerfs.fs.upper import Upper  # noqa: E402
from layerfs.store.rows import PATH  # noqa: E402
from layerfs.store.store import Store  # noqa: E402
from layerfs.store.tarindex import index_tar  # noqa: E402
from tests.helpers import build_tar, tar_member  # noqa: E402

MTIME = 1_700_000_000


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    link: str = "",
    uid: int = 0,
    gid: int = 0,
) -> tuple[tarfile.TarInfo, bytes]:
    return tar_member(name, kind, data=data, mode=mode, linkname=link, uid=uid, gid=gid)


BASE = build_tar(
    member("etc", tarfile.DIRTYPE, mode=0o755),
    member("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
    member("etc/big", data=bytes(range(256)) * 8192),  # 2 MiB: copied up in a thread
    member("etc/hard", tarfile.LNKTYPE, link="etc/passwd"),
    member("lib", tarfile.DIRTYPE, mode=0o755),
    member("lib/sub", tarfile.DIRTYPE, mode=0o700),
    member("lib/sub/file", data=b"deep"),
    member("link", tarfile.SYMTYPE, link="etc/passwd", mode=0o777),
    member("gone", data=b"old"),
)
TOP = build_tar(member(".wh.gone"), member("etc/new", data=b"added\n", uid=7, gid=8))


@dataclass
class Ctx:
    uid: int = 0
    gid: int = 0
    pid: int = 1
    umask: int = 0o022


@dataclass
class Fields:
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False


@dataclass
class Mounted:
    store: Store
    ops: Operations
    upper: Upper | None
    image_id: str
    tars: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def t(self) -> Any:
        return self.ops.t

    def ino(self, path: str) -> int:
        return self.t.resolve(path.encode())


def make_image(store: Store, *layers: bytes) -> str:
    parent = ""
    for data in layers:
        staged = store.layers.ingest(io.BytesIO(data))
        parent = store.graph.create(staged, parent=parent).id
    return parent


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def open_mount(
    store: Store, image_id: str, *, writable: bool, upper: str = "u", init: bool = False
) -> Mounted:
    lower = from_store(store, store.graph.get(image_id), image_id, init=init)
    tars = lower.open_tars()
    up = None
    if writable:
        up = Upper.open(
            lower.tree,
            store.subdir("upper") / upper,
            image_id=image_id,
            diff_ids=lower.diff_ids,
            tars=tars,
            init=init,
            tmp_root=store.tmp,
        )
    return Mounted(store, Operations(Core(lower.tree, tars, upper=up)), up, image_id, tars)


@pytest.fixture
def ro(store: Store) -> Iterator[Mounted]:
    mounted = open_mount(store, make_image(store, BASE, TOP), writable=False)
    yield mounted
    for fd in mounted.tars:
        os.close(fd)


@pytest.fixture
def rw(store: Store) -> Iterator[Mounted]:
    mounted = open_mount(store, make_image(store, BASE, TOP), writable=True)
    yield mounted
    assert mounted.upper is not None
    mounted.upper.close()
    for fd in mounted.tars:
        os.close(fd)


async def read_all(ops: Operations, ino: int) -> bytes:
    info = await ops.open(ino, os.O_RDONLY, Ctx())
    try:
        data = b""
        while True:
            chunk = bytes(await ops.read(info.fh, len(data), 128 * 1024))
            if not chunk:
                return data
            data += chunk
    finally:
        await ops.release(info.fh)


async def listdir(
    ops: Operations, ino: int, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[bytes, int, int]]:
    """All entries, read two per readdir call as a small kernel buffer would."""
    accepted: list[tuple[bytes, int, int]] = []
    room = [0]

    def reply(token: object, name: bytes, attr: Any, next_id: int) -> bool:
        if room[0] == 0:
            return False
        room[0] -= 1
        accepted.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(ino, Ctx())
    start = 0
    while True:
        room[0] = 2
        before = len(accepted)
        await ops.readdir(fh, start, None)
        if len(accepted) == before:
            break
        start = accepted[-1][2]
    await ops.releasedir(fh)
    return accepted


# -- read-only -----------------------------------------------------------------------------


@pytest.mark.trio
async def test_lookup_getattr_and_negative_entries(ro: Mounted):
    ops = ro.ops
    etc = await ops.lookup(ROOT, b"etc", Ctx())
    passwd = await ops.lookup(etc.st_ino, b"passwd", Ctx())
    hard = await ops.lookup(etc.st_ino, b"hard", Ctx())

    assert stat.S_ISDIR(etc.st_mode) and etc.st_ino == ro.ino("etc")
    assert passwd.st_ino == hard.st_ino and passwd.st_nlink == 2
    assert passwd.entry_timeout > 3600 and passwd.attr_timeout > 3600
    new = await ops.getattr(ro.ino("etc/new"), Ctx())
    assert (new.st_uid, new.st_gid, new.st_size) == (7, 8, 6)
    assert new.st_mtime_ns == MTIME * 10**9
    missing = await ops.lookup(ROOT, b"gone", Ctx())
    assert missing.st_ino == 0 and missing.entry_timeout > 3600  # cached negative entry
    assert (await ops.lookup(etc.st_ino, b"..", Ctx())).st_ino == ROOT
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.getattr(999999, Ctx())
    assert err.value.errno == errno.ENOENT


@pytest.mark.trio
async def test_read_data_links_and_xattrs(ro: Mounted):
    ops = ro.ops
    assert await read_all(ops, ro.ino("etc/passwd")) == b"root:x:0:0::/root:/bin/sh\n"
    assert await read_all(ops, ro.ino("etc/big")) == bytes(range(256)) * 8192
    assert await read_all(ops, ro.ino("lib/sub/file")) == b"deep"
    assert await ops.readlink(ro.ino("link"), Ctx()) == b"etc/passwd"
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.getxattr(ro.ino("link"), b"user.nope", Ctx())
    assert err.value.errno == pyfuse3.ENOATTR
    assert await ops.listxattr(ro.ino("link"), Ctx()) == []


@pytest.mark.trio
async def test_readdir_resumes_at_offsets_and_agrees_with_lookup(
    ro: Mounted, monkeypatch: pytest.MonkeyPatch
):
    entries = await listdir(ro.ops, ro.ino("etc"), monkeypatch)

    assert [name for name, _, _ in entries[:2]] == [b".", b".."]
    assert entries[0][1] == ro.ino("etc") and entries[1][1] == ROOT
    entries = entries[2:]
    assert sorted(name for name, _, _ in entries) == [b"big", b"hard", b"new", b"passwd"]
    for name, ino, _ in entries:
        assert (await ro.ops.lookup(ro.ino("etc"), name, Ctx())).st_ino == ino


@pytest.mark.trio
async def test_names_past_name_max_and_trusted_xattrs_as_ext4_answers(rw: Mounted):
    ops = rw.ops
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.lookup(ROOT, b"n" * 256, Ctx())
    assert err.value.errno == errno.ENAMETOOLONG
    assert (await ops.lookup(ROOT, b"n" * 255, Ctx())).st_ino == 0  # a negative entry
    ino = rw.ino("etc/passwd")
    await ops.setxattr(ino, b"trusted.t", b"1", Ctx())
    await ops.setxattr(ino, b"user.u", b"2", Ctx())
    assert sorted(await ops.listxattr(ino, Ctx())) == [b"trusted.t", b"user.u"]
    assert await ops.listxattr(ino, Ctx(uid=1000, gid=1000)) == [b"user.u"]
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.setxattr(ino, b"odd.x", b"1", Ctx())
    assert err.value.errno == errno.EOPNOTSUPP


@pytest.mark.trio
async def test_open_with_o_trunc_truncates_and_setattr_keeps_atime_apart(rw: Mounted):
    ops = rw.ops
    ino = rw.ino("etc/big")
    info = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, Ctx())
    await ops.write(info.fh, 0, b"x\n")
    await ops.release(info.fh)
    assert await read_all(ops, ino) == b"x\n"
    assert data_files(rw) == ["0"]
    attr = pyfuse3.EntryAttributes()
    attr.st_atime_ns, attr.st_mtime_ns = 10**9, 2 * 10**9
    got = await ops.setattr(ino, attr, Fields(update_atime=True, update_mtime=True), None, Ctx())
    assert (got.st_atime_ns, got.st_mtime_ns) == (10**9, 2 * 10**9)
    assert got.st_ctime_ns > 2 * 10**9


@pytest.mark.trio
async def test_read_only_refuses_writes(ro: Mounted):
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ro.ops.open(ro.ino("etc/passwd"), os.O_RDWR, Ctx())
    assert err.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ro.ops.mkdir(ROOT, b"x", 0o755, Ctx())
    assert err.value.errno == errno.EROFS
    statfs = await ro.ops.statfs(Ctx())
    assert statfs.f_files >= len(ro.t) and statfs.f_namemax == 255


@pytest.mark.trio
async def test_a_bug_in_a_handler_becomes_eio(ro: Mounted, caplog: pytest.LogCaptureFixture):
    def broken(ino: int) -> None:
        raise ZeroDivisionError("boom")

    ro.ops._attr = broken  # type: ignore[method-assign]
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ro.ops.getattr(ROOT, Ctx())
    assert err.value.errno == errno.EIO
    assert "internal error in getattr" in caplog.text


# -- writable ------------------------------------------------------------------------------


async def write_file(
    ops: Operations, parent: int, name: bytes, data: bytes, ctx: Ctx | None = None
) -> int:
    info, attr = await ops.create(parent, name, 0o644, os.O_WRONLY, ctx or Ctx())
    await ops.write(info.fh, 0, data)
    await ops.release(info.fh)
    return attr.st_ino


def data_files(mounted: Mounted) -> list[str]:
    assert mounted.upper is not None
    return sorted(os.listdir(mounted.upper.data_dir))


@pytest.mark.trio
async def test_create_write_read_and_owner(rw: Mounted):
    ops = rw.ops
    ino = await write_file(ops, rw.ino("etc"), b"fresh", b"hello", Ctx(uid=1000, gid=1000))

    attr = await ops.getattr(ino, Ctx())
    assert (attr.st_uid, attr.st_gid, attr.st_size) == (1000, 1000, 5)
    assert await read_all(ops, ino) == b"hello"
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.create(ROOT, b".wh.sneaky", 0o644, os.O_WRONLY, Ctx())
    assert err.value.errno == errno.EPERM


@pytest.mark.trio
async def test_chmod_chown_utimens_setxattr_copy_metadata_only(rw: Mounted):
    ops = rw.ops
    ino = rw.ino("etc/big")
    attr = pyfuse3.EntryAttributes()
    attr.st_mode, attr.st_uid, attr.st_gid, attr.st_mtime_ns = 0o4711, 42, 43, 5 * 10**9
    await ops.setattr(
        ino,
        attr,
        Fields(update_mode=True, update_uid=True, update_gid=True, update_mtime=True),
        None,
        Ctx(),
    )
    await ops.setxattr(ino, b"user.note", b"v", Ctx())

    got = await ops.getattr(ino, Ctx())
    assert stat.S_IMODE(got.st_mode) == 0o4711 and (got.st_uid, got.st_gid) == (42, 43)
    assert got.st_mtime_ns == 5 * 10**9
    assert await ops.getxattr(ino, b"user.note", Ctx()) == b"v"
    assert data_files(rw) == []  # no data was copied
    await ops.removexattr(ino, b"user.note", Ctx())
    assert await ops.listxattr(ino, Ctx()) == []


@pytest.mark.trio
async def test_copy_up_on_write_keeps_the_rest_and_both_hardlink_names(rw: Mounted):
    ops = rw.ops
    ino = rw.ino("etc/passwd")
    reader = await ops.open(ino, os.O_RDONLY, Ctx())
    writer = await ops.open(ino, os.O_WRONLY, Ctx())
    await ops.write(writer.fh, 0, b"ROOT")

    # The reader that opened the file before the copy-up sees the new data.
    assert bytes(await ops.read(reader.fh, 0, 100)) == b"ROOT:x:0:0::/root:/bin/sh\n"
    await ops.release(writer.fh)
    await ops.release(reader.fh)
    assert await read_all(ops, rw.ino("etc/hard")) == b"ROOT:x:0:0::/root:/bin/sh\n"
    assert data_files(rw) == ["0"]


@pytest.mark.trio
async def test_big_copy_up_and_truncate(rw: Mounted):
    ops = rw.ops
    ino = rw.ino("etc/big")
    info = await ops.open(ino, os.O_RDWR, Ctx())
    await ops.write(info.fh, 1 << 20, b"X")
    attr = pyfuse3.EntryAttributes()
    attr.st_size = (1 << 20) + 1
    await ops.setattr(ino, attr, Fields(update_size=True), info.fh, Ctx())
    await ops.release(info.fh)

    data = await read_all(ops, ino)
    expected = (bytes(range(256)) * 8192)[: 1 << 20] + b"X"
    assert data == expected
    attr.st_size = 0
    await ops.setattr(rw.ino("lib/sub/file"), attr, Fields(update_size=True), None, Ctx())
    assert await read_all(ops, rw.ino("lib/sub/file")) == b""


@pytest.mark.trio
async def test_unlink_while_open_keeps_data_until_release_and_forget(rw: Mounted):
    ops = rw.ops
    etc = rw.ino("etc")
    ino = await write_file(ops, etc, b"tmp", b"temporary")
    info = await ops.open(ino, os.O_RDONLY, Ctx())
    await ops.unlink(etc, b"tmp", Ctx())

    assert bytes(await ops.read(info.fh, 0, 100)) == b"temporary"
    assert (await ops.lookup(etc, b"tmp", Ctx())).st_ino == 0
    await ops.release(info.fh)
    assert data_files(rw) == ["0"]  # the kernel still knows the inode
    await ops.forget([(ino, 1)])
    assert data_files(rw) == []
    assert not rw.t.alive(ino)


@pytest.mark.trio
async def test_rename_lower_directory_and_exchange(rw: Mounted):
    ops = rw.ops
    lib = rw.ino("lib")
    await ops.rename(ROOT, b"lib", ROOT, b"lib2", 0, Ctx())
    assert rw.ino("lib2/sub/file") and not rw.ino("lib")
    assert await read_all(ops, rw.ino("lib2/sub/file")) == b"deep"
    assert rw.ino("lib2") == lib
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.rename(ROOT, b"lib2", lib, b"inside", 0, Ctx())
    assert err.value.errno == errno.EINVAL
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.rename(ROOT, b"etc", ROOT, b"lib2", 0, Ctx())
    assert err.value.errno == errno.ENOTEMPTY
    await ops.rename(ROOT, b"etc", ROOT, b"lib2", pyfuse3.RENAME_EXCHANGE, Ctx())
    assert rw.ino("etc/sub/file") and rw.ino("lib2/passwd")
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.rename(ROOT, b"etc", ROOT, b"lib2", pyfuse3.RENAME_NOREPLACE, Ctx())
    assert err.value.errno == errno.EEXIST


@pytest.mark.trio
async def test_rmdir_mkdir_symlink_mknod_link(rw: Mounted):
    ops = rw.ops
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.rmdir(rw.ino("lib"), b"sub", Ctx())
    assert err.value.errno == errno.ENOTEMPTY
    await ops.unlink(rw.ino("lib/sub"), b"file", Ctx())
    await ops.rmdir(rw.ino("lib"), b"sub", Ctx())
    d = await ops.mkdir(rw.ino("lib"), b"sub", 0o750, Ctx())
    assert stat.S_IMODE(d.st_mode) == 0o750 and d.st_nlink == 2
    s = await ops.symlink(ROOT, b"sym", b"/nowhere", Ctx())
    assert s.st_size == len(b"/nowhere")
    n = await ops.mknod(ROOT, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), Ctx())
    assert n.st_rdev == os.makedev(1, 3)
    f = await ops.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, Ctx())
    assert stat.S_ISFIFO(f.st_mode)
    sock = await ops.mknod(ROOT, b"sock", stat.S_IFSOCK | 0o755, 0, Ctx())
    assert stat.S_ISSOCK(sock.st_mode)
    assert rw.upper is not None
    assert b"sock" not in [row[PATH] for row in rw.upper.rows()]  # never in a layer
    linked = await ops.link(rw.ino("etc/new"), ROOT, b"newlink", Ctx())
    assert linked.st_nlink == 2
    assert (await ops.getattr(rw.ino("lib"), Ctx())).st_nlink == 3


# -- the upper's changes as a layer ---------------------------------------------------------


async def make_changes(ops: Operations, m: Mounted) -> None:
    etc, lib = m.ino("etc"), m.ino("lib")
    await write_file(ops, etc, b"fresh", b"new file\n")
    info = await ops.open(m.ino("etc/passwd"), os.O_WRONLY, Ctx())
    await ops.write(info.fh, 0, b"ROOT")
    await ops.release(info.fh)
    await ops.unlink(etc, b"big", Ctx())
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = 0o600
    await ops.setattr(m.ino("etc/new"), attr, Fields(update_mode=True), None, Ctx())
    await ops.rename(ROOT, b"lib", ROOT, b"lib2", 0, Ctx())
    await ops.mkdir(ROOT, b"lib", 0o755, Ctx())  # a new directory where a lower one was
    await ops.symlink(ROOT, b"sym", b"lib2/sub", Ctx())
    await ops.link(m.ino("lib2/sub/file"), m.ino("lib"), b"file-link", Ctx())
    await ops.mknod(m.ino("lib"), b"dev", stat.S_IFBLK | 0o600, os.makedev(8, 1), Ctx())
    await ops.setxattr(m.ino("link"), b"trusted.x", b"\x00\xff", Ctx())
    del lib


def snapshot(tree: MergedTree) -> list[tuple[Any, ...]]:
    rows = []
    groups: dict[int, bytes] = {}
    for path, node in tree.walk():
        e = node.entry
        group = groups.setdefault(node.ino, path) if e.type != "d" else None
        rows.append(
            (
                path,
                e.type,
                e.mode,
                e.uid,
                e.gid,
                e.size,
                e.linkname,
                e.devmajor,
                e.devminor,
                sorted((e.xattrs or {}).items()),
                group,
                tree.table.nlink[node.ino] if e.type != "d" else 0,
            )
        )
    return rows


def contents(tree: MergedTree, tars: list[int], upper: Upper | None) -> dict[bytes, bytes]:
    t = tree.table
    out = {}
    for path, node in tree.walk():
        if node.entry.type == "f":
            ino = node.ino
            if t.layer[ino] >= 0:
                out[path] = os.pread(tars[t.layer[ino]], t.size[ino], t.offset[ino])
            elif upper is not None and t.layer[ino] == -3:
                out[path] = os.pread(upper.fd(ino), t.size[ino], 0)
            else:
                out[path] = b""
    return out


@pytest.mark.trio
async def test_commit_rows_give_exactly_the_mounted_tree(rw: Mounted, store: Store):
    await make_changes(rw.ops, rw)
    assert rw.upper is not None
    rw.upper.save()
    expected_tree = rw.ops.ops.tree
    expected = snapshot(expected_tree)
    expected_data = contents(expected_tree, rw.tars, rw.upper)

    out = io.BytesIO()
    write_layer_tar(
        read_state(rw.upper.directory)["rows"], rw.upper.directory, out, store.layers.open_tar
    )
    out.seek(0)
    staged = store.layers.ingest(out)
    new_image = store.graph.create(staged, parent=rw.image_id).id
    committed = open_mount(store, new_image, writable=False)
    try:
        assert snapshot(committed.ops.ops.tree) == expected
        assert contents(committed.ops.ops.tree, committed.tars, None) == expected_data
    finally:
        for fd in committed.tars:
            os.close(fd)
    names = [e.path for e in index_tar(io.BytesIO(out.getvalue())).entries]
    assert b"etc/.wh.big" in names and b".wh.lib" not in names
    assert b"lib/.wh..wh..opq" in names and b"lib2/sub/file" in names


@pytest.mark.trio
async def test_saved_upper_is_laid_again_by_the_next_mount(rw: Mounted, store: Store):
    await make_changes(rw.ops, rw)
    assert rw.upper is not None
    expected = snapshot(rw.ops.ops.tree)
    expected_data = contents(rw.ops.ops.tree, rw.tars, rw.upper)
    rw.upper.close()

    again = open_mount(store, rw.image_id, writable=True)
    try:
        assert again.upper is not None
        assert snapshot(again.ops.ops.tree) == expected
        assert contents(again.ops.ops.tree, again.tars, again.upper) == expected_data
        # The same changes, though an opaque directory may come back as whiteouts.
        names = {r[PATH] for r in again.upper.rows()}
        assert names - {b"lib/.wh.sub"} == {
            r[PATH] for r in read_state(again.upper.directory)["rows"]
        } - {b"lib/.wh..wh..opq"}
        info = await again.ops.open(again.ino("etc/fresh"), os.O_WRONLY, Ctx())
        await again.ops.write(info.fh, 0, b"NEW")
        await again.ops.release(info.fh)
    finally:
        assert again.upper is not None
        again.upper.close()
        for fd in again.tars:
            os.close(fd)
    rw.upper = open_mount(store, rw.image_id, writable=True).upper  # closed by the fixture


def test_an_upper_is_used_by_one_mount_at_a_time(store: Store):
    image = make_image(store, BASE)
    first = open_mount(store, image, writable=True)
    try:
        from layerfs.errors import MountpointBusyError

        with pytest.raises(MountpointBusyError):
            open_mount(store, image, writable=True)
    finally:
        assert first.upper is not None
        first.upper.close()
        for fd in first.tars:
            os.close(fd)
