"""layerfs.fs.union.MergedTree: the FORMATS §7/§9 rules on layers indexed from real tars.

Whiteouts, opaque directories, replacing, implied parents, hardlinks, AUFS metadata,
attributes, the init layer, reading (walk, listdir, inode numbers), rows streamed
from the store, and what a lookup costs (the inodes and layers it reads).
"""

from __future__ import annotations

import dataclasses
import io
import stat
import tarfile
from typing import Any

import pytest

from layerfs.fs.inodes import LAYER_IMPLIED, LAYER_INIT, ROOT, InodeTable
from layerfs.fs.union import MergedTree
from layerfs.store import rows
from layerfs.store.tarindex import DIR, REG, SYMLINK, Entry, index_tar
from tests.helpers import build_tar, tar_dir, tar_file, tar_hardlink, tar_member, tar_symlink


def lay(*members: tuple[tarfile.TarInfo, bytes]) -> list[Entry]:
    """The index entries of a tar holding ``members``."""
    return index_tar(io.BytesIO(build_tar(*members))).entries


def paths(tree: MergedTree) -> list[bytes]:
    return [p for p, _ in tree.walk() if p]


def kind_of(tree: MergedTree, path: bytes) -> str | None:
    node = tree.lookup(path)
    return node.entry.type if node else None


BASE = lay(
    tar_dir("etc"),
    tar_file("etc/passwd", b"root\n"),
    tar_file("etc/group", b"root\n"),
    tar_dir("usr"),
    tar_dir("usr/share"),
    tar_dir("usr/share/doc"),
    tar_file("usr/share/doc/readme", b"doc"),
    tar_file("usr/share/doc/license", b"gpl"),
    tar_dir("var"),
    tar_file("var/log", b"log"),
)


# -- whiteouts --------------------------------------------------------------------------------


def test_whiteout_of_a_file() -> None:
    tree = MergedTree.build([BASE, lay(tar_file("etc/.wh.passwd"))])
    assert tree.lookup(b"etc/passwd") is None
    assert tree.listdir(b"etc") == [b"group"]
    assert tree.lookup(b"etc/.wh.passwd") is None  # the marker itself is never visible


def test_whiteout_of_a_whole_directory_tree() -> None:
    tree = MergedTree.build([BASE, lay(tar_file(".wh.usr"))])
    assert [p for p in paths(tree) if p.startswith(b"usr")] == []
    assert tree.lookup(b"usr/share/doc/readme") is None
    assert paths(tree) == [b"etc", b"etc/group", b"etc/passwd", b"var", b"var/log"]


def test_whiteout_does_not_hide_entries_of_its_own_layer() -> None:
    for top in (
        lay(tar_file("etc/.wh.passwd"), tar_file("etc/passwd", b"new\n")),
        lay(tar_file("etc/passwd", b"new\n"), tar_file("etc/.wh.passwd")),
    ):
        tree = MergedTree.build([BASE, top])
        node = tree.lookup(b"etc/passwd")
        assert node is not None and node.layer == 1 and node.entry.size == 4


def test_whiteout_then_recreate_a_directory_in_the_same_layer() -> None:
    top = lay(tar_file(".wh.usr"), tar_dir("usr"), tar_file("usr/new", b"n"))
    tree = MergedTree.build([BASE, top])
    assert [p for p in paths(tree) if p.startswith(b"usr")] == [b"usr", b"usr/new"]


def test_whiteout_of_a_directory_the_same_layer_wrote_into_keeps_the_new_content() -> None:
    base = lay(tar_dir("dir", 0o700), tar_file("dir/old"))
    top = lay(tar_file("dir/new"), tar_file(".wh.dir"))
    tree = MergedTree.build([base, top])
    assert paths(tree) == [b"dir", b"dir/new"]
    node = tree.lookup(b"dir")
    assert node is not None and node.entry.mode == 0o755  # recreated, as by mkdir -p


def test_whiteout_position_in_the_tar_is_irrelevant() -> None:
    first = lay(tar_file("etc/.wh.group"), tar_file("etc/shadow", b"s"), tar_file(".wh.var"))
    last = lay(tar_file("etc/shadow", b"s"), tar_file(".wh.var"), tar_file("etc/.wh.group"))
    trees = [MergedTree.build([BASE, top]) for top in (first, last)]
    assert paths(trees[0]) == paths(trees[1])
    assert paths(trees[0]) == [
        b"etc",
        b"etc/passwd",
        b"etc/shadow",
        b"usr",
        b"usr/share",
        b"usr/share/doc",
        b"usr/share/doc/license",
        b"usr/share/doc/readme",
    ]


def test_whiteout_of_something_absent_is_ignored() -> None:
    tree = MergedTree.build([BASE, lay(tar_file(".wh.nothing"), tar_file("etc/.wh.nothing"))])
    assert paths(tree) == paths(MergedTree.build([BASE]))


def test_a_whiteout_in_a_missing_directory_creates_it_as_docker_does() -> None:
    # Docker's layer extraction makes the parents of every entry, whiteouts included.
    tree = MergedTree.build([BASE, lay(tar_file("nodir/deeper/.wh.x"))])
    assert paths(tree) == sorted([*paths(MergedTree.build([BASE])), b"nodir", b"nodir/deeper"])
    node = tree.lookup(b"nodir/deeper")
    assert node is not None and tree.listdir(b"nodir/deeper") == []
    assert node.layer == LAYER_IMPLIED and node.entry.type == DIR and node.entry.mode == 0o755
    assert (node.entry.uid, node.entry.gid) == (0, 0)


def test_a_whiteout_only_acts_on_lower_layers_not_upper_ones() -> None:
    tree = MergedTree.build([BASE, lay(tar_file("etc/.wh.passwd")), lay(tar_file("etc/passwd"))])
    node = tree.lookup(b"etc/passwd")
    assert node is not None and node.layer == 2


# -- opaque directories -----------------------------------------------------------------------


def test_opaque_dir_hides_lower_children_but_keeps_its_own_layer_s() -> None:
    top = lay(tar_dir("etc"), tar_file("etc/.wh..wh..opq"), tar_file("etc/hostname", b"h"))
    tree = MergedTree.build([BASE, top])
    assert tree.listdir(b"etc") == [b"hostname"]
    assert tree.lookup(b"etc/.wh..wh..opq") is None
    assert tree.lookup(b"var/log") is not None  # other directories are untouched


def test_opaque_marker_position_in_the_tar_is_irrelevant() -> None:
    after = lay(
        tar_dir("usr/share"), tar_file("usr/share/mine"), tar_file("usr/share/.wh..wh..opq")
    )
    tree = MergedTree.build([BASE, after])
    assert tree.listdir(b"usr/share") == [b"mine"]
    assert tree.lookup(b"usr/share/doc") is None  # a lower subdirectory goes, tree and all


def test_opaque_root_directory() -> None:
    top = lay(tar_file(".wh..wh..opq"), tar_dir("etc"), tar_file("etc/only", b"1"))
    tree = MergedTree.build([BASE, top])
    assert paths(tree) == [b"etc", b"etc/only"]


def test_opaque_dir_over_a_directory_the_layer_also_fills_deeper() -> None:
    top = lay(tar_file("usr/share/doc/new", b"n"), tar_file("usr/.wh..wh..opq"))
    tree = MergedTree.build([BASE, top])
    assert [p for p in paths(tree) if p.startswith(b"usr")] == [
        b"usr",
        b"usr/share",
        b"usr/share/doc",
        b"usr/share/doc/new",
    ]


def test_opaque_after_the_layer_merged_a_lower_subdirectory_keeps_its_metadata() -> None:
    base = lay(tar_dir("d"), tar_dir("d/sub"), tar_file("d/sub/old"), tar_file("d/gone"))
    top = lay(
        tar_dir("d"), tar_dir("d/sub", 0o711), tar_file("d/sub/new"), tar_file("d/.wh..wh..opq")
    )
    tree = MergedTree.build([base, top])
    assert paths(tree) == [b"d", b"d/sub", b"d/sub/new"]
    sub = tree.lookup(b"d/sub")
    assert sub is not None and sub.entry.mode == 0o711


def test_opaque_dir_in_the_base_layer_hides_nothing_of_its_own() -> None:
    tree = MergedTree.build([lay(tar_dir("d"), tar_file("d/.wh..wh..opq"), tar_file("d/f"))])
    assert paths(tree) == [b"d", b"d/f"]


# -- replacing --------------------------------------------------------------------------------


def test_directory_over_a_file() -> None:
    tree = MergedTree.build([BASE, lay(tar_dir("var/log"), tar_file("var/log/syslog", b"x"))])
    assert kind_of(tree, b"var/log") == DIR
    assert tree.listdir(b"var/log") == [b"syslog"]


def test_file_over_a_directory_drops_the_tree_below() -> None:
    tree = MergedTree.build([BASE, lay(tar_file("usr", b"now a file"))])
    assert kind_of(tree, b"usr") == REG
    assert tree.lookup(b"usr/share") is None
    assert tree.listdir(b"usr") == []


def test_one_layer_turns_a_directory_into_a_file_and_a_file_into_a_directory() -> None:
    base = lay(tar_dir("x"), tar_file("x/inner"), tar_file("y"))
    top = lay(tar_file("x", b"now a file"), tar_dir("y"), tar_file("y/inside"))
    tree = MergedTree.build([base, top])
    assert paths(tree) == [b"x", b"y", b"y/inside"]
    assert kind_of(tree, b"x") == REG and kind_of(tree, b"y") == DIR


def test_symlink_over_a_directory() -> None:
    tree = MergedTree.build([BASE, lay(tar_symlink("usr", "/opt"))])
    node = tree.lookup(b"usr")
    assert node is not None and node.entry.type == SYMLINK and node.entry.linkname == b"/opt"
    assert tree.lookup(b"usr/share") is None


def test_directory_over_a_directory_merges_and_takes_the_new_metadata() -> None:
    tree = MergedTree.build([BASE, lay(tar_dir("etc", 0o700), tar_file("etc/new"))])
    assert tree.listdir(b"etc") == [b"passwd", b"group", b"new"]
    node = tree.lookup(b"etc")
    assert node is not None and node.entry.mode == 0o700 and node.layer == 1
    assert node.children is not None and list(node.children) == [b"passwd", b"group", b"new"]


def test_an_upper_file_replaces_a_lower_one() -> None:
    tree = MergedTree.build([BASE, lay(tar_file("etc/passwd", b"root:x\n", mode=0o600))])
    node = tree.lookup(b"etc/passwd")
    assert node is not None
    assert (node.layer, node.entry.size, node.entry.mode) == (1, 7, 0o600)
    group = tree.lookup(b"etc/group")
    assert group is not None and group.layer == 0


def test_implied_parent_directories() -> None:
    tree = MergedTree.build([lay(tar_file("a/b/c/file", b"x"))])
    for path in (b"a", b"a/b", b"a/b/c"):
        node = tree.lookup(path)
        assert node is not None and node.entry.type == DIR
        assert node.layer == LAYER_IMPLIED and node.entry.mode == 0o755
        assert (node.entry.uid, node.entry.gid) == (0, 0)
    assert tree.lookup(b"a/b/c/file") is not None


def test_implied_parent_over_a_lower_file() -> None:
    tree = MergedTree.build([BASE, lay(tar_file("var/log/app.log", b"x"))])
    assert kind_of(tree, b"var/log") == DIR
    assert tree.listdir(b"var/log") == [b"app.log"]


@pytest.mark.parametrize("name", ["./", "."])
def test_root_entry_sets_the_root_s_metadata(name: str) -> None:
    tree = MergedTree.build(
        [lay(tar_member(name, tarfile.DIRTYPE, mode=0o700, uid=5), tar_file("f"))]
    )
    root = tree.lookup(b"")
    assert root is not None and root.layer == 0
    assert (root.entry.mode, root.entry.uid) == (0o700, 5)


def test_data_offsets_and_layers_point_into_the_right_tar() -> None:
    data = build_tar(tar_file("a", b"lower"))
    upper = build_tar(tar_file("b", b"upper data"))
    tree = MergedTree.build(
        [index_tar(io.BytesIO(data)).entries, index_tar(io.BytesIO(upper)).entries]
    )
    for path, tar, content in ((b"a", data, b"lower"), (b"b", upper, b"upper data")):
        node = tree.lookup(path)
        assert node is not None
        start = node.entry.offset
        assert tar[start : start + node.entry.size] == content


# -- hardlinks --------------------------------------------------------------------------------


def test_hardlinks_within_a_layer_share_one_inode_and_a_link_key() -> None:
    tree = MergedTree.build(
        [
            lay(
                tar_dir("bin"),
                tar_file("bin/busybox", b"ELF" * 10, mode=0o755),
                tar_hardlink("bin/sh", "bin/busybox"),
                tar_hardlink("bin/ls", "bin/sh"),  # a link to a link: same group
                tar_hardlink("top", "bin/busybox"),  # another directory: same group
                tar_file("bin/other", b"x"),
            )
        ]
    )
    busybox, sh, ls, top, other = (
        tree.lookup(p) for p in (b"bin/busybox", b"bin/sh", b"bin/ls", b"top", b"bin/other")
    )
    assert busybox and sh and ls and top and other
    assert busybox.ino == sh.ino == ls.ino == top.ino != other.ino
    assert tree.table.nlink[busybox.ino] == 4
    assert busybox.link_key is not None
    assert busybox.link_key == sh.link_key == ls.link_key == top.link_key
    assert other.link_key is None
    for node in (sh, ls, top):
        assert node.entry.type == REG
        assert (node.entry.size, node.entry.offset) == (busybox.entry.size, busybox.entry.offset)
        assert node.entry.mode == 0o755
    assert tree.link_counts() == {busybox.link_key: 4}


def test_hardlink_whose_original_is_whited_out_above_still_resolves() -> None:
    base_tar = build_tar(
        tar_file("usr/bin/perl5.36", b"perl binary"),
        tar_hardlink("usr/bin/perl", "usr/bin/perl5.36"),
    )
    base = index_tar(io.BytesIO(base_tar)).entries
    tree = MergedTree.build([base, lay(tar_file("usr/bin/.wh.perl5.36"))])
    assert tree.lookup(b"usr/bin/perl5.36") is None
    assert tree.listdir(b"usr/bin") == [b"perl"]
    perl = tree.lookup(b"usr/bin/perl")
    assert perl is not None and perl.entry.type == REG
    assert tree.table.nlink[perl.ino] == 1
    start = perl.entry.offset
    assert base_tar[start : start + perl.entry.size] == b"perl binary"
    assert perl.link_key is not None
    assert tree.link_counts() == {perl.link_key: 1}


@pytest.mark.parametrize("replaced", [b"a", b"b"])
def test_a_hardlink_group_split_by_an_upper_layer(replaced: bytes) -> None:
    base = lay(tar_file("a", b"shared"), tar_hardlink("b", "a"))
    tree = MergedTree.build([base, lay(tar_file(replaced.decode(), b"replaced"))])
    new, old = (tree.lookup(p) for p in (replaced, b"b" if replaced == b"a" else b"a"))
    assert new and old
    assert new.entry.size == 8 and old.entry.size == 6
    assert new.ino != old.ino and tree.table.nlink[old.ino] == 1
    assert new.link_key != old.link_key


def test_aufs_metadata_is_ignored() -> None:
    tree = MergedTree.build(
        [
            lay(
                tar_dir(".wh..wh.plnk"),
                tar_file(".wh..wh.plnk/1234.5678", b"stash"),
                tar_file(".wh..wh.aufs"),
                tar_dir(".wh..wh.orph"),
                tar_file("kept", b"k"),
            )
        ]
    )
    assert paths(tree) == [b"kept"]


def test_hardlink_into_the_aufs_link_dir_is_retargeted() -> None:
    # FORMATS §7: the files of .wh..wh.plnk/ are not extracted, but a hardlink whose
    # target is in there gets that file's data (Docker re-targets it to a temp copy).
    data = build_tar(
        tar_dir(".wh..wh.plnk"),
        tar_file(".wh..wh.plnk/1234.5678", b"stashed data", mode=0o750),
        tar_dir("usr"),
        tar_hardlink("usr/bin-a", ".wh..wh.plnk/1234.5678"),
        tar_hardlink("usr/bin-b", ".wh..wh.plnk/1234.5678"),
    )
    tree = MergedTree.build([index_tar(io.BytesIO(data)).entries])
    assert paths(tree) == [b"usr", b"usr/bin-a", b"usr/bin-b"]
    a, b = tree.lookup(b"usr/bin-a"), tree.lookup(b"usr/bin-b")
    assert a is not None and b is not None
    assert a.entry.type == REG and a.entry.mode == 0o750
    assert data[a.entry.offset : a.entry.offset + a.entry.size] == b"stashed data"
    assert a.link_key is not None and a.link_key == b.link_key
    assert tree.link_counts() == {a.link_key: 2}


def test_whiteout_like_names_deeper_down_are_never_visible() -> None:
    tree = MergedTree.build([lay(tar_dir("d"), tar_file("d/.wh..wh.aufs"), tar_file("d/x"))])
    assert paths(tree) == [b"d", b"d/x"]


# -- attributes ---------------------------------------------------------------------------------


def test_devices_fifos_owners_xattrs_and_symlinks_are_kept() -> None:
    capability = "\x01\x00\x00\x02\x00\x20\x00\x00"
    tree = MergedTree.build(
        [
            lay(
                tar_member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
                tar_member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6),
                tar_member("dev/fifo", tarfile.FIFOTYPE, mode=0o600),
                tar_member("suid", mode=0o4755, uid=1234567, gid=7654321),
                tar_member("cap", pax={"SCHILY.xattr.security.capability": capability}),
                tar_symlink("abs", "/etc/passwd"),
                tar_symlink("dangling", "../nowhere"),
            )
        ]
    )
    null = tree.lookup(b"dev/null")
    assert null is not None and (null.entry.devmajor, null.entry.devminor) == (1, 3)
    assert null.entry.mode == 0o666
    t = tree.table
    assert stat.S_ISCHR(t.mode[null.ino]) and t.rdev[null.ino] == (1 << 8 | 3)
    sda = t.resolve(b"dev/sda")
    assert stat.S_ISBLK(t.mode[sda]) and t.gid[sda] == 6
    fifo = tree.lookup(b"dev/fifo")
    assert fifo is not None and fifo.entry.type == "p" and stat.S_ISFIFO(t.mode[fifo.ino])
    suid = t.resolve(b"suid")
    assert t.mode[suid] & 0o7777 == 0o4755 and (t.uid[suid], t.gid[suid]) == (1234567, 7654321)
    assert t.xattrs[t.resolve(b"cap")]["security.capability"].startswith(b"\x01\x00")
    assert t.targets[t.resolve(b"abs")] == b"/etc/passwd"
    dangling = tree.lookup(b"dangling")
    assert dangling is not None and dangling.entry.type == SYMLINK
    assert dangling.entry.linkname == b"../nowhere" and dangling.entry.size == len(b"../nowhere")


def test_non_utf8_and_long_names() -> None:
    weird = b"caf\xe9-\xff"
    long_name = "n" * 255
    tree = MergedTree.build(
        [lay(tar_file(weird.decode("utf-8", "surrogateescape"), b"x"), tar_file(long_name, b"y"))]
    )
    assert tree.lookup(weird) is not None
    assert tree.lookup(long_name.encode()) is not None


# -- init layer -------------------------------------------------------------------------------


def test_init_layer_on_an_empty_image() -> None:
    tree = MergedTree.build([lay(tar_file("bin/sh"))], init=True)
    for parent in (b"dev", b"etc", b"dev/pts", b"dev/shm", b"proc", b"sys"):
        node = tree.lookup(parent)
        assert node is not None and node.entry.type == DIR and node.entry.mode == 0o755
        assert node.layer == LAYER_INIT
    for path in (
        b".dockerenv",
        b".dockerinit",
        b"etc/hosts",
        b"etc/hostname",
        b"etc/resolv.conf",
        b"dev/console",
    ):
        node = tree.lookup(path)
        assert node is not None and node.entry.type == REG and node.entry.size == 0
        assert node.entry.mode == 0o755 and node.layer == LAYER_INIT
    mtab = tree.lookup(b"etc/mtab")
    assert mtab is not None and mtab.entry.type == SYMLINK
    assert mtab.entry.linkname == b"/proc/mounts"
    assert sorted(tree.listdir(b"")) == [
        b".dockerenv",
        b".dockerinit",
        b"bin",
        b"dev",
        b"etc",
        b"proc",
        b"sys",
    ]


def test_init_layer_keeps_directories_and_replaces_files_and_symlinks() -> None:
    image = lay(
        tar_dir("etc", 0o750),
        tar_file("etc/hosts", b"127.0.0.1 image\n"),
        tar_symlink("etc/resolv.conf", "/run/resolv.conf"),
        tar_symlink("etc/mtab", "/somewhere"),
        tar_dir("proc", 0o555),
        tar_file("proc/leftover"),
        tar_dir("etc/hostname"),  # a directory where the init layer wants a file
    )
    tree = MergedTree.build([image], init=True)
    etc = tree.lookup(b"etc")
    assert etc is not None and etc.entry.mode == 0o750 and etc.layer == 0
    proc = tree.lookup(b"proc")
    assert proc is not None and proc.entry.mode == 0o555 and proc.layer == 0
    assert tree.listdir(b"proc") == [b"leftover"]
    for path in (b"etc/hosts", b"etc/resolv.conf"):
        node = tree.lookup(path)
        assert node is not None and node.layer == LAYER_INIT
        assert node.entry.type == REG and node.entry.size == 0 and node.entry.mode == 0o755
    mtab = tree.lookup(b"etc/mtab")
    assert mtab is not None and mtab.layer == LAYER_INIT
    assert mtab.entry.linkname == b"/proc/mounts"
    hostname = tree.lookup(b"etc/hostname")
    assert hostname is not None and hostname.entry.type == DIR and hostname.layer == 0


@pytest.mark.parametrize("parent", ["etc", "dev"])
def test_init_layer_replaces_a_symlinked_parent(parent: str) -> None:
    tree = MergedTree.build([lay(tar_symlink(parent, "/host/" + parent))], init=True)
    node = tree.lookup(parent.encode())
    assert node is not None and node.entry.type == DIR and node.layer == LAYER_INIT
    assert node.entry.mode == 0o755
    if parent == "etc":
        assert sorted(tree.listdir(b"etc")) == [b"hostname", b"hosts", b"mtab", b"resolv.conf"]


# -- reading ----------------------------------------------------------------------------------


def test_walk_yields_parents_first_and_siblings_sorted() -> None:
    tree = MergedTree.build(
        [lay(tar_file("b/z"), tar_file("b/a"), tar_dir("a"), tar_file("c"), tar_file("a/y"))]
    )
    assert [p for p, _ in tree.walk()] == [b"", b"a", b"a/y", b"b", b"b/a", b"b/z", b"c"]
    seen: set[bytes] = set()
    for path, _ in tree.walk():
        if path:
            assert path.rpartition(b"/")[0] in seen
        seen.add(path)


def test_listdir_nodes_and_len_keep_tar_order_and_miss_missing_paths() -> None:
    tree = MergedTree.build([lay(tar_file("d/z"), tar_file("d/a"))])
    assert tree.listdir(b"d") == [b"z", b"a"]
    assert tree.listdir(b"d/z") == []
    assert tree.listdir(b"missing") == []
    assert tree.lookup(b"missing") is None
    assert tree.lookup(b"d/z/below-a-file") is None
    assert set(tree.nodes) == {b"", b"d", b"d/z", b"d/a"}
    assert len(tree) == 4


def test_inode_numbers_are_stable_and_match_the_name_maps() -> None:
    layers = [
        lay(tar_dir("a"), tar_file("a/1"), tar_file("b")),
        lay(tar_file(".wh.b"), tar_file("c"), tar_hardlink("a/2", "c")),
    ]
    one, two = MergedTree.build(layers, init=True), MergedTree.build(layers, init=True)
    assert [(p, n.ino) for p, n in one.walk()] == [(p, n.ino) for p, n in two.walk()]
    t = one.table
    for path, node in one.walk():
        if path:
            parent, _, name = path.rpartition(b"/")
            assert t.child(t.resolve(parent), name) == node.ino
    assert t.resolve(b"") == ROOT and one.lookup(b"") is not None
    assert len(one) == len(list(one.walk()))


@pytest.mark.parametrize("count", [2, 10])
def test_many_layers_stack(count: int) -> None:
    layers = [lay(tar_file(f"f{i}", b"x"), tar_file(f".wh.f{i - 1}")) for i in range(count)]
    tree = MergedTree.build(layers)
    assert paths(tree) == [f"f{count - 1}".encode()]


# -- rows ---------------------------------------------------------------------------------------


def test_row_columns_are_the_entry_fields_in_order() -> None:
    entry = Entry(b"p", REG, 0o644, 1, 2, 3, 4, 5, b"l", 6, 7, {"user.x": b"y"})
    row = entry.to_row()
    names = {
        "path": rows.PATH,
        "type": rows.TYPE,
        "mode": rows.MODE,
        "uid": rows.UID,
        "gid": rows.GID,
        "size": rows.SIZE,
        "mtime_ns": rows.MTIME_NS,
        "offset": rows.OFFSET,
        "linkname": rows.LINKNAME,
        "devmajor": rows.DEVMAJOR,
        "devminor": rows.DEVMINOR,
        "xattrs": rows.XATTRS,
    }
    assert [f.name for f in dataclasses.fields(Entry)] == list(names)
    assert len(row) == rows.INDEX_COLUMNS == len(names)
    for name, column in names.items():
        assert row[column] == getattr(entry, name)
    upper = rows.new_row(
        b"p",
        REG,
        mode=0o644,
        uid=1,
        gid=2,
        size=3,
        mtime_ns=4,
        offset=5,
        linkname=b"l",
        devmajor=6,
        devminor=7,
        xattrs={"user.x": b"y"},
        source="sha256:x",
    )
    assert upper[: rows.INDEX_COLUMNS] == row and upper[rows.SOURCE] == "sha256:x"


def test_a_source_column_names_the_layer_a_file_s_data_comes_from() -> None:
    def row(path: bytes, source: int | None) -> rows.Row:
        return rows.new_row(path, REG, mode=0o644, size=1, offset=512, source=source)

    tree = MergedTree.from_rows([[row(b"f", None)], [row(b"g", 0), row(b"h", None)]])
    f, g, h = (tree.lookup(p) for p in (b"f", b"g", b"h"))
    assert f is not None and g is not None and h is not None
    assert (f.layer, g.layer, h.layer) == (0, 0, 1)
    assert g.entry.offset == 512


def test_rows_streamed_from_the_store_build_the_same_tree(tmp_path: Any) -> None:
    from layerfs.store.store import Store

    store = Store.open(tmp_path / "store")
    tar = build_tar(
        tar_dir("a"), tar_file("a/x", b"1"), tar_hardlink("a/y", "a/x"), tar_symlink("s", "a")
    )
    staged = store.layers.ingest(io.BytesIO(tar))
    staged.publish()

    streamed_rows = list(store.layers.index_rows(staged.diff_id))
    assert streamed_rows == [e.to_row() for e in store.layers.entries(staged.diff_id)]
    streamed = MergedTree.from_rows([iter(streamed_rows)])
    built = MergedTree.build([store.layers.entries(staged.diff_id)])
    assert [(p, n.entry, n.ino) for p, n in streamed.walk()] == [
        (p, n.entry, n.ino) for p, n in built.walk()
    ]


# -- what a lookup costs ------------------------------------------------------------------------

_COLUMNS = (
    "mode",
    "uid",
    "gid",
    "size",
    "mtime",
    "offset",
    "layer",
    "parent",
    "nlink",
    "children",
    "targets",
    "rdev",
    "xattrs",
    "ctime",
    "atime",
)


class _Noting:
    """A column of the inode table that notes every inode it is asked about."""

    def __init__(self, column: Any, read: set[int]) -> None:
        self._column = column
        self._read = read

    def __getitem__(self, ino: int) -> Any:
        self._read.add(ino)
        return self._column[ino]

    def get(self, ino: int, default: Any = None) -> Any:
        self._read.add(ino)
        return self._column.get(ino, default)

    def __contains__(self, ino: int) -> bool:
        self._read.add(ino)
        return ino in self._column

    def __len__(self) -> int:
        return len(self._column)

    def items(self) -> Any:
        self._read.update(self._column)
        return self._column.items()

    def __iter__(self) -> Any:
        self._read.update(
            range(len(self._column)) if not isinstance(self._column, dict) else self._column
        )
        return iter(self._column)


def layers_read(tree: MergedTree, action: Any) -> tuple[Any, set[int], set[int]]:
    """(what ``action()`` returns, the inodes and the layers it read from the tree's table).

    Every per-inode column of the table is swapped for one that notes the inodes asked
    about; the layers are those the inodes came from (implied parents count for none).
    """
    t: InodeTable = tree.table
    layer_of = list(t.layer)
    read: set[int] = set()
    saved = {name: getattr(t, name) for name in _COLUMNS}
    for name, column in saved.items():
        setattr(t, name, _Noting(column, read))
    try:
        result = action()
    finally:
        for name, column in saved.items():
            setattr(t, name, column)
    return result, read, {layer_of[ino] for ino in read if layer_of[ino] >= 0}


def stack(count: int) -> MergedTree:
    """``count`` layers, each adding ``d/file<i>`` to one directory all of them list."""
    return MergedTree.build([lay(tar_dir("d"), tar_file(f"d/file{i}", b"x")) for i in range(count)])


@pytest.mark.parametrize("count", [1, 50])
def test_a_lookup_reads_the_layers_of_its_path_only(count: int) -> None:
    tree = stack(count)
    d = tree.table.resolve(b"d")
    for number in {0, count - 1}:
        path = f"d/file{number}".encode()
        node, inodes, layers = layers_read(tree, lambda p=path: tree.lookup(p))
        assert node is not None and node.layer == number
        # The root, the directory and the file: whatever the depth of the stack.
        assert inodes <= {ROOT, d, node.ino}
        assert layers == {count - 1, number}  # the directory's last metadata, the file
    node, inodes, layers = layers_read(tree, lambda: tree.lookup(b"d/missing"))
    assert node is None and inodes <= {ROOT, d} and layers <= {count - 1}


def test_the_lookup_cost_measure_sees_a_lookup_that_walks_every_layer() -> None:
    tree = stack(50)
    node, inodes, layers = layers_read(tree, lambda: tree.nodes[b"d/file0"])
    assert node.layer == 0 and layers == set(range(50)) and len(inodes) == 52
