"""Tests for layerfs.fs.union.MergedTree: the FORMATS §7/§9 rules on layers from real tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from layerfs.fs.inodes import LAYER_IMPLIED as IMPLIED
from layerfs.fs.inodes import LAYER_INIT as INIT_LAYER
from layerfs.fs.union import MergedTree
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
    assert node.layer == IMPLIED and node.entry.type == DIR and node.entry.mode == 0o755
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


def test_an_upper_file_replaces_a_lower_one() -> None:
    tree = MergedTree.build([BASE, lay(tar_file("etc/passwd", b"root:x\n", mode=0o600))])
    node = tree.lookup(b"etc/passwd")
    assert node is not None
    assert (node.layer, node.entry.size, node.entry.mode) == (1, 7, 0o600)


def test_implied_parent_directories() -> None:
    tree = MergedTree.build([lay(tar_file("a/b/c/file", b"x"))])
    for path in (b"a", b"a/b", b"a/b/c"):
        node = tree.lookup(path)
        assert node is not None and node.entry.type == DIR
        assert node.layer == IMPLIED and node.entry.mode == 0o755
    assert tree.lookup(b"a/b/c/file") is not None


def test_implied_parent_over_a_lower_file() -> None:
    tree = MergedTree.build([BASE, lay(tar_file("var/log/app.log", b"x"))])
    assert kind_of(tree, b"var/log") == DIR
    assert tree.listdir(b"var/log") == [b"app.log"]


def test_root_entry_sets_the_root_s_metadata() -> None:
    tree = MergedTree.build([lay(tar_dir("./", 0o700), tar_file("f"))])
    root = tree.lookup(b"")
    assert root is not None and root.entry.mode == 0o700 and root.layer == 0


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


def test_hardlinks_within_a_layer_share_a_link_key() -> None:
    tree = MergedTree.build(
        [
            lay(
                tar_dir("bin"),
                tar_file("bin/busybox", b"ELF" * 10, mode=0o755),
                tar_hardlink("bin/sh", "bin/busybox"),
                tar_hardlink("bin/ls", "bin/sh"),  # a link to a link: same group
                tar_file("bin/other", b"x"),
            )
        ]
    )
    busybox, sh, ls, other = (
        tree.lookup(b"bin/" + n) for n in (b"busybox", b"sh", b"ls", b"other")
    )
    assert busybox and sh and ls and other
    assert busybox.link_key is not None
    assert busybox.link_key == sh.link_key == ls.link_key
    assert other.link_key is None
    for node in (sh, ls):
        assert node.entry.type == REG
        assert (node.entry.size, node.entry.offset) == (busybox.entry.size, busybox.entry.offset)
        assert node.entry.mode == 0o755
    assert tree.link_counts() == {busybox.link_key: 3}


def test_hardlink_whose_original_is_whited_out_above_still_resolves() -> None:
    base_tar = build_tar(
        tar_file("usr/bin/perl5.36", b"perl binary"),
        tar_hardlink("usr/bin/perl", "usr/bin/perl5.36"),
    )
    base = index_tar(io.BytesIO(base_tar)).entries
    tree = MergedTree.build([base, lay(tar_file("usr/bin/.wh.perl5.36"))])
    assert tree.lookup(b"usr/bin/perl5.36") is None
    perl = tree.lookup(b"usr/bin/perl")
    assert perl is not None and perl.entry.type == REG
    start = perl.entry.offset
    assert base_tar[start : start + perl.entry.size] == b"perl binary"
    assert perl.link_key is not None
    assert tree.link_counts() == {perl.link_key: 1}


def test_a_hardlink_group_split_by_an_upper_layer() -> None:
    base = lay(tar_file("a", b"shared"), tar_hardlink("b", "a"))
    tree = MergedTree.build([base, lay(tar_file("a", b"replaced"))])
    a, b = tree.lookup(b"a"), tree.lookup(b"b")
    assert a and b
    assert a.entry.size == 8 and b.entry.size == 6
    assert a.link_key != b.link_key


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


# -- init layer -------------------------------------------------------------------------------


def test_init_layer_on_an_empty_image() -> None:
    tree = MergedTree.build([lay(tar_file("bin/sh"))], init=True)
    for parent in (b"dev", b"etc"):
        node = tree.lookup(parent)
        assert node is not None and node.entry.type == DIR and node.entry.mode == 0o755
        assert node.layer == INIT_LAYER
    console = tree.lookup(b"dev/console")
    assert console is not None and console.entry.type == REG and console.entry.size == 0
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
        assert node is not None and node.layer == INIT_LAYER
        assert node.entry.type == REG and node.entry.size == 0 and node.entry.mode == 0o755
    hostname = tree.lookup(b"etc/hostname")
    assert hostname is not None and hostname.entry.type == DIR and hostname.layer == 0


def test_init_layer_replaces_a_symlinked_parent() -> None:
    tree = MergedTree.build([lay(tar_symlink("etc", "/host/etc"))], init=True)
    etc = tree.lookup(b"etc")
    assert etc is not None and etc.entry.type == DIR and etc.layer == INIT_LAYER
    assert etc.entry.mode == 0o755
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


def test_listdir_keeps_tar_order_and_lookup_of_missing_paths() -> None:
    tree = MergedTree.build([lay(tar_file("d/z"), tar_file("d/a"))])
    assert tree.listdir(b"d") == [b"z", b"a"]
    assert tree.listdir(b"d/z") == []
    assert tree.listdir(b"missing") == []
    assert tree.lookup(b"missing") is None
    assert tree.lookup(b"d/z/below-a-file") is None


@pytest.mark.parametrize("count", [2, 10])
def test_many_layers_stack(count: int) -> None:
    layers = [lay(tar_file(f"f{i}", b"x"), tar_file(f".wh.f{i - 1}")) for i in range(count)]
    tree = MergedTree.build(layers)
    assert paths(tree) == [f"f{count - 1}".encode()]


def test_devices_and_fifos_keep_their_numbers() -> None:
    tree = MergedTree.build(
        [
            lay(
                tar_member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
                tar_member("dev/fifo", tarfile.FIFOTYPE),
            )
        ]
    )
    null = tree.lookup(b"dev/null")
    assert null is not None and (null.entry.devmajor, null.entry.devminor) == (1, 3)
    assert null.entry.mode == 0o666
    fifo = tree.lookup(b"dev/fifo")
    assert fifo is not None and fifo.entry.type == "p"
