"""layerfs.fs.union: merging layer indexes built from real tars (whiteouts, opaque, links, init)."""

from __future__ import annotations

import io
import stat
import tarfile

import pytest

from layerfs.fs.inodes import LAYER_IMPLIED, LAYER_INIT, ROOT
from layerfs.fs.union import MergedTree
from layerfs.store.tarindex import DIR, REG, SYMLINK, Entry, index_tar

MTIME = 1_700_000_000


def member(name: str | bytes, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *,
           mode: int | None = None, link: str = "", uid: int = 0, gid: int = 0,
           mtime: int = MTIME, dev: tuple[int, int] = (0, 0),
           xattrs: dict[str, bytes] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name if isinstance(name, str) else name.decode("utf-8",
                                                                          "surrogateescape"))
    info.type = kind
    info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    info.uid, info.gid, info.mtime = uid, gid, mtime
    info.devmajor, info.devminor = dev
    if xattrs:
        info.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                            for k, v in xattrs.items()}
    return info, data


def d(name: str, mode: int = 0o755, **kw: object) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def f(name: str | bytes, data: bytes = b"", **kw: object) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.SYMTYPE, mode=0o777, link=target)


def hard(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, tarfile.LNKTYPE, link=target)


def layer(*members: tuple[tarfile.TarInfo, bytes]) -> list[Entry]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buf.seek(0)
    return index_tar(buf).entries


def paths(tree: MergedTree) -> list[bytes]:
    return [p for p, _ in tree.walk() if p]


# -- merging ---------------------------------------------------------------------------------


def test_two_layers_merge_and_upper_file_replaces_lower():
    base = layer(d("etc"), f("etc/a", b"one"), f("etc/b", b"two"))
    top = layer(d("etc", mode=0o700), f("etc/a", b"three", mode=0o600), f("etc/c"))

    tree = MergedTree.build([base, top])

    assert paths(tree) == [b"etc", b"etc/a", b"etc/b", b"etc/c"]
    a = tree.lookup(b"etc/a")
    assert a is not None and a.layer == 1 and a.entry.size == 5 and a.entry.mode == 0o600
    b = tree.lookup(b"etc/b")
    assert b is not None and b.layer == 0
    etc = tree.lookup(b"etc")
    assert etc is not None and etc.entry.mode == 0o700 and etc.layer == 1
    assert etc.children is not None and sorted(etc.children) == [b"a", b"b", b"c"]


def test_parents_missing_from_the_tar_are_implied():
    tree = MergedTree.build([layer(f("a/b/c", b"x"))])

    node = tree.lookup(b"a/b")
    assert node is not None and node.layer == LAYER_IMPLIED
    assert node.entry.type == DIR and node.entry.mode == 0o755 and node.entry.uid == 0


def test_file_replaces_directory_and_directory_replaces_file():
    base = layer(d("x"), f("x/inner"), f("y"))
    top = layer(f("x", b"now a file"), d("y"), f("y/inside"))

    tree = MergedTree.build([base, top])

    assert paths(tree) == [b"x", b"y", b"y/inside"]
    x = tree.lookup(b"x")
    assert x is not None and x.entry.type == REG


def test_root_entry_sets_root_metadata():
    tree = MergedTree.build([layer(d(".", mode=0o700, uid=5), f("a"))])

    root = tree.lookup(b"")
    assert root is not None and root.entry.mode == 0o700 and root.entry.uid == 5


# -- whiteouts and opaque directories ----------------------------------------------------------


def test_whiteout_removes_file_and_directory_tree_of_lower_layers():
    base = layer(d("a"), f("a/1"), d("a/sub"), f("a/sub/2"), f("keep"))
    top = layer(f(".wh.a"), f(".wh.missing"))

    tree = MergedTree.build([base, top])

    assert paths(tree) == [b"keep"]


def test_whiteout_never_hides_its_own_layer_whatever_the_order():
    base = layer(f("x", b"old"), f("y", b"old"))
    # x is recreated after its whiteout, y before it: both survive with the new content.
    top = layer(f(".wh.x"), f("x", b"new!"), f("y", b"new!"), f(".wh.y"))

    tree = MergedTree.build([base, top])

    for name in (b"x", b"y"):
        node = tree.lookup(name)
        assert node is not None and node.layer == 1 and node.entry.size == 4


def test_whiteout_of_directory_the_same_layer_wrote_into_keeps_the_new_content():
    base = layer(d("dir", mode=0o700), f("dir/old"))
    top = layer(f("dir/new"), f(".wh.dir"))

    tree = MergedTree.build([base, top])

    assert paths(tree) == [b"dir", b"dir/new"]
    node = tree.lookup(b"dir")
    assert node is not None and node.entry.mode == 0o755  # recreated, as by mkdir -p


def test_opaque_hides_lower_children_only_whatever_its_position():
    base = layer(d("d"), f("d/old1"), d("d/olddir"), f("d/olddir/x"))
    first = layer(d("d"), f("d/.wh..wh..opq"), f("d/new1"))
    last = layer(d("d"), f("d/new2"), f("d/.wh..wh..opq"))

    assert paths(MergedTree.build([base, first])) == [b"d", b"d/new1"]
    assert paths(MergedTree.build([base, last])) == [b"d", b"d/new2"]


def test_opaque_after_the_layer_merged_a_lower_subdirectory():
    base = layer(d("d"), d("d/sub"), f("d/sub/old"), f("d/gone"))
    top = layer(d("d"), d("d/sub", mode=0o711), f("d/sub/new"), f("d/.wh..wh..opq"))

    tree = MergedTree.build([base, top])

    assert paths(tree) == [b"d", b"d/sub", b"d/sub/new"]
    sub = tree.lookup(b"d/sub")
    assert sub is not None and sub.entry.mode == 0o711


def test_opaque_at_the_root():
    base = layer(d("bin"), f("bin/sh"), f("top"))
    top = layer(f(".wh..wh..opq"), f("fresh"))

    tree = MergedTree.build([base, top])

    assert paths(tree) == [b"fresh"]


def test_aufs_metadata_is_never_visible():
    tree = MergedTree.build([layer(d(".wh..wh.plnk"), f(".wh..wh.plnk/123.456"),
                                   f(".wh..wh.aufs"), f("a"))])

    assert paths(tree) == [b"a"]


def test_whiteout_in_a_directory_that_does_not_exist_creates_the_directory():
    tree = MergedTree.build([layer(f("a")), layer(f("nodir/.wh.x"))])

    assert paths(tree) == [b"a", b"nodir"]  # as Docker's extraction does


# -- hardlinks -----------------------------------------------------------------------------


def test_hardlinks_share_one_inode_and_count_links():
    tree = MergedTree.build([layer(d("a"), f("a/f", b"data"), hard("a/g", "a/f"),
                                   hard("h", "a/f"))])

    f_node, g_node, h_node = (tree.lookup(p) for p in (b"a/f", b"a/g", b"h"))
    assert f_node and g_node and h_node
    assert f_node.ino == g_node.ino == h_node.ino
    assert g_node.entry.size == 4 and g_node.entry.type == REG
    assert tree.table.nlink[f_node.ino] == 3
    assert f_node.link_key == g_node.link_key is not None
    assert tree.link_counts() == {f_node.link_key: 3}


def test_hardlink_survives_whiteout_of_its_first_name():
    base = layer(f("f", b"data"), hard("g", "f"))
    top = layer(f(".wh.f"))

    tree = MergedTree.build([base, top])

    g = tree.lookup(b"g")
    assert paths(tree) == [b"g"]
    assert g is not None and g.entry.size == 4 and tree.table.nlink[g.ino] == 1


def test_replacing_one_name_of_a_hardlink_group_in_a_later_layer():
    base = layer(f("f", b"data"), hard("g", "f"))
    top = layer(f("g", b"other"))

    tree = MergedTree.build([base, top])

    f_node, g_node = tree.lookup(b"f"), tree.lookup(b"g")
    assert f_node and g_node and f_node.ino != g_node.ino
    assert tree.table.nlink[f_node.ino] == 1


# -- attributes ----------------------------------------------------------------------------


def test_special_files_and_attributes_are_kept():
    tree = MergedTree.build([layer(
        member("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        member("dev/sda", tarfile.BLKTYPE, mode=0o660, dev=(8, 0), gid=6),
        member("fifo", tarfile.FIFOTYPE, mode=0o600),
        f("suid", mode=0o4755, uid=1234567, gid=7654321),
        f("cap", xattrs={"security.capability": b"\x01\x00\x00\x02\x00\x20\x00\x00"}),
        sym("abs", "/etc/passwd"), sym("dangling", "../nowhere"),
    )])

    t = tree.table
    null = t.resolve(b"dev/null")
    assert stat.S_ISCHR(t.mode[null]) and t.rdev[null] == (1 << 8 | 3)
    sda = t.resolve(b"dev/sda")
    assert stat.S_ISBLK(t.mode[sda]) and t.gid[sda] == 6
    assert stat.S_ISFIFO(t.mode[t.resolve(b"fifo")])
    suid = t.resolve(b"suid")
    assert t.mode[suid] & 0o7777 == 0o4755 and (t.uid[suid], t.gid[suid]) == (1234567, 7654321)
    assert t.xattrs[t.resolve(b"cap")]["security.capability"].startswith(b"\x01\x00")
    assert t.targets[t.resolve(b"abs")] == b"/etc/passwd"
    node = tree.lookup(b"dangling")
    assert node is not None and node.entry.type == SYMLINK and node.entry.linkname == b"../nowhere"


def test_non_utf8_and_long_names():
    weird = b"caf\xe9-\xff"
    long_name = "n" * 255
    tree = MergedTree.build([layer(f(weird, b"x"), f(long_name, b"y"))])

    assert tree.lookup(weird) is not None
    assert tree.lookup(long_name.encode()) is not None


# -- init layer ------------------------------------------------------------------------------


def test_init_layer_adds_placeholders():
    tree = MergedTree.build([layer(d("bin"), f("bin/sh"))], init=True)

    for path in (b"dev/pts", b"dev/shm", b"proc", b"sys"):
        node = tree.lookup(path)
        assert node is not None and node.entry.type == DIR and node.layer == LAYER_INIT
    for path in (b".dockerenv", b".dockerinit", b"etc/hosts", b"etc/hostname",
                 b"etc/resolv.conf", b"dev/console"):
        node = tree.lookup(path)
        assert node is not None and node.entry.type == REG and node.entry.size == 0
        assert node.entry.mode == 0o755
    mtab = tree.lookup(b"etc/mtab")
    assert mtab is not None and mtab.entry.linkname == b"/proc/mounts"


def test_init_layer_replaces_files_and_symlinks_but_keeps_directories():
    image = layer(d("etc", mode=0o750), f("etc/hosts", b"127.0.0.1 x\n"), d("etc/hostname"),
                  sym("etc/mtab", "/somewhere"), d("proc", mode=0o555), sym("dev", "/other"))

    tree = MergedTree.build([image], init=True)

    hosts = tree.lookup(b"etc/hosts")
    assert hosts is not None and hosts.layer == LAYER_INIT and hosts.entry.size == 0
    hostname = tree.lookup(b"etc/hostname")
    assert hostname is not None and hostname.entry.type == DIR and hostname.layer == 0
    etc = tree.lookup(b"etc")
    assert etc is not None and etc.entry.mode == 0o750
    proc = tree.lookup(b"proc")
    assert proc is not None and proc.entry.mode == 0o555
    dev = tree.lookup(b"dev")
    assert dev is not None and dev.entry.type == DIR
    mtab = tree.lookup(b"etc/mtab")
    assert mtab is not None and mtab.entry.linkname == b"/proc/mounts"


# -- identity --------------------------------------------------------------------------------


def test_inode_numbers_are_stable_and_match_the_name_maps():
    layers = [layer(d("a"), f("a/1"), f("b")), layer(f(".wh.b"), f("c"), hard("a/2", "c"))]

    one, two = MergedTree.build(layers, init=True), MergedTree.build(layers, init=True)

    assert [(p, n.ino) for p, n in one.walk()] == [(p, n.ino) for p, n in two.walk()]
    t = one.table
    seen = {}
    for path, node in one.walk():
        if path:
            parent, _, name = path.rpartition(b"/")
            assert t.child(t.resolve(parent), name) == node.ino
        seen.setdefault(node.ino, path)
    assert one.lookup(b"")
    assert t.resolve(b"") == ROOT
    assert len(one) == len(list(one.walk()))


def test_nodes_listdir_and_len():
    tree = MergedTree.build([layer(d("a"), f("a/x"), f("a/y"))])

    assert tree.listdir(b"a") == [b"x", b"y"]
    assert tree.listdir(b"a/x") == []
    assert set(tree.nodes) == {b"", b"a", b"a/x", b"a/y"}
    assert len(tree) == 4


@pytest.mark.parametrize("count", [1, 50])
def test_many_layers_cost_no_more_per_lookup(count: int):
    layers = [layer(f(f"file{i}", b"x")) for i in range(count)]

    tree = MergedTree.build(layers)

    assert tree.lookup(b"file0") is not None
    assert tree.lookup(f"file{count - 1}".encode()) is not None
    assert len(tree) == count + 1


def test_rows_streamed_from_the_store_build_the_same_tree(tmp_path):
    from layerfs.store.store import Store

    store = Store.open(tmp_path / "store")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in (d("a"), f("a/x", b"1"), hard("a/y", "a/x"), sym("s", "a")):
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    staged = store.layers.ingest(io.BytesIO(buf.getvalue()))
    staged.publish()

    rows = list(store.layers.index_rows(staged.diff_id))
    assert rows == [e.to_row() for e in store.layers.entries(staged.diff_id)]
    streamed = MergedTree.from_rows([iter(rows)])
    built = MergedTree.build([store.layers.entries(staged.diff_id)])
    assert [(p, n.entry, n.ino) for p, n in streamed.walk()] == \
        [(p, n.entry, n.ino) for p, n in built.walk()]
