"""Tests for layerfs.store.files: atomic writes, publication, removal and the kernel locks."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from layerfs.errors import StoreError, StoreLockedError
from layerfs.store import files
from layerfs.store.files import (
    FileLock,
    atomic_write,
    locked,
    make_temp_dir,
    publish_dir,
    remove_tree,
    temp_path,
    trash,
)
from tests.helpers import spawn_python


@pytest.fixture
def tmp_root(tmp_path: Path) -> Path:
    path = tmp_path / "tmp"
    path.mkdir()
    return path


@pytest.fixture
def umask_022() -> object:
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- temp names -------------------------------------------------------------------------------


def test_make_temp_dir_is_private_and_names_its_owner(tmp_root: Path, umask_022: object) -> None:
    path = make_temp_dir(tmp_root, "layer")
    prefix, owner, token = path.name.split("-")
    assert (prefix, owner) == ("layer", files.owner_name(tmp_root))
    assert owner.startswith(f"{os.getpid()}o")
    assert len(token) == 12 and int(token, 16) >= 0
    assert path.parent == tmp_root
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert make_temp_dir(tmp_root, "layer") != path


def test_temp_path_does_not_create_anything(tmp_root: Path) -> None:
    path = temp_path(tmp_root, "write")
    assert path.name.startswith(f"write-{files.owner_name(tmp_root)}-")
    assert not path.exists()


# -- atomic_write -----------------------------------------------------------------------------


def test_atomic_write_creates_a_file(tmp_path: Path, tmp_root: Path, umask_022: object) -> None:
    target = tmp_path / "file"
    atomic_write(target, b"content", tmp_root)
    assert target.read_bytes() == b"content"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # the default mode
    assert list(tmp_root.iterdir()) == []


def test_atomic_write_replaces_the_whole_file(tmp_path: Path, tmp_root: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"a much longer old content " * 100)
    before = target.stat().st_ino
    atomic_write(target, b"new", tmp_root, mode=0o644)
    assert target.read_bytes() == b"new"
    assert target.stat().st_ino != before  # a new file renamed over the old one
    assert list(tmp_root.iterdir()) == []


def test_atomic_write_mode(tmp_path: Path, tmp_root: Path, umask_022: object) -> None:
    target = tmp_path / "file"
    atomic_write(target, b"x", tmp_root, mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_atomic_write_of_large_and_empty_data(tmp_path: Path, tmp_root: Path) -> None:
    big = os.urandom(3 << 20)
    atomic_write(tmp_path / "big", big, tmp_root)
    assert (tmp_path / "big").read_bytes() == big
    atomic_write(tmp_path / "empty", b"", tmp_root)
    assert (tmp_path / "empty").read_bytes() == b""


def test_atomic_write_accepts_a_memoryview(tmp_path: Path, tmp_root: Path) -> None:
    atomic_write(tmp_path / "f", memoryview(b"view"), tmp_root)  # type: ignore[arg-type]
    assert (tmp_path / "f").read_bytes() == b"view"


def test_atomic_write_leaves_no_temp_when_writing_fails(
    tmp_path: Path, tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(files.NoSpaceError, match=f"no space left on the file system of {tmp_path}"):
        atomic_write(target, b"new", tmp_root)
    assert target.read_bytes() == b"old"
    assert list(tmp_root.iterdir()) == []


def test_atomic_write_leaves_no_temp_when_the_data_is_no_bytes(
    tmp_path: Path, tmp_root: Path
) -> None:
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "file", "text, not bytes", tmp_root)  # type: ignore[arg-type]
    assert not (tmp_path / "file").exists()
    assert list(tmp_root.iterdir()) == []


def test_atomic_write_leaves_no_temp_when_the_rename_fails(tmp_path: Path, tmp_root: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no-such-dir" / "file", b"x", tmp_root)
    assert list(tmp_root.iterdir()) == []
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "a-dir", b"x", tmp_root)
    assert list(tmp_root.iterdir()) == []


# -- publish_dir ------------------------------------------------------------------------------


def _staged(tmp_root: Path, content: bytes) -> Path:
    staged = make_temp_dir(tmp_root, "stage")
    (staged / "data").write_bytes(content)
    (staged / "sub").mkdir()
    (staged / "sub" / "more").write_bytes(content * 2)
    (staged / "link").symlink_to("data")
    return staged


def test_publish_dir_renames_into_place(tmp_path: Path, tmp_root: Path) -> None:
    staged = _staged(tmp_root, b"one")
    final = tmp_path / "store" / "deep" / "item"
    assert publish_dir(staged, final) is True
    assert not staged.exists()
    assert (final / "data").read_bytes() == b"one"
    assert (final / "sub" / "more").read_bytes() == b"oneone"
    assert os.readlink(final / "link") == "data"


def test_publish_dir_first_writer_wins(tmp_path: Path, tmp_root: Path) -> None:
    final = tmp_path / "item"
    first, second = _staged(tmp_root, b"first"), _staged(tmp_root, b"second")
    assert publish_dir(first, final) is True
    assert publish_dir(second, final) is False
    assert (final / "data").read_bytes() == b"first"
    assert list(tmp_root.iterdir()) == []


def test_publish_dir_over_an_empty_directory(tmp_path: Path, tmp_root: Path) -> None:
    final = tmp_path / "item"
    final.mkdir()  # rename(2) may replace an empty directory
    assert publish_dir(_staged(tmp_root, b"x"), final) is True
    assert (final / "data").read_bytes() == b"x"


def test_publish_dir_other_errors_propagate(tmp_path: Path, tmp_root: Path) -> None:
    final = tmp_path / "file"
    final.write_bytes(b"a file where the directory should go")
    staged = _staged(tmp_root, b"x")
    with pytest.raises(NotADirectoryError):
        publish_dir(staged, final)
    assert staged.is_dir()  # the caller decides what to do with it


# -- remove_tree, trash -----------------------------------------------------------------------


def test_remove_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    (tree / "link").symlink_to(outside)
    remove_tree(tree)
    assert not tree.exists()
    assert (outside / "keep").read_bytes() == b"keep"  # symlinks are not followed


def test_remove_tree_of_files_symlinks_and_nothing(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    target = tmp_path / "dir"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    remove_tree(tmp_path / "f")
    remove_tree(tmp_path / "link")
    remove_tree(tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_trash_removes_and_leaves_nothing_in_tmp(tmp_path: Path, tmp_root: Path) -> None:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "f").write_bytes(b"x")
    trash(victim, tmp_root)
    assert not victim.exists()
    assert list(tmp_root.iterdir()) == []
    trash(victim, tmp_root)  # missing: fine


# -- FileLock ---------------------------------------------------------------------------------


def test_file_lock_excludes_other_open_files(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    first, second = FileLock(path), FileLock(path)
    assert first.acquire() is True
    assert first.held
    assert second.acquire(blocking=False) is False
    assert not second.held
    assert second.acquire(exclusive=False, blocking=False) is False
    first.release()
    assert not first.held
    assert second.acquire(blocking=False) is True
    second.release()


def test_shared_file_locks_coexist_but_exclude_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    a, b, c = FileLock(path), FileLock(path), FileLock(path)
    assert a.acquire(exclusive=False) and b.acquire(exclusive=False, blocking=False)
    assert c.acquire(blocking=False) is False
    a.release()
    assert c.acquire(blocking=False) is False
    b.release()
    assert c.acquire(blocking=False) is True
    c.release()


def test_file_lock_twice_on_one_object_is_an_error(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "lock")
    lock.acquire()
    with pytest.raises(StoreError, match="already taken by this object"):
        lock.acquire()
    lock.release()
    lock.release()  # releasing twice is harmless


def test_file_lock_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileLock(tmp_path / "missing" / "lock").acquire()


def test_file_lock_without_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lock"
    path.write_bytes(b"")
    path.chmod(0o400)
    if os.geteuid() == 0:
        # Root opens a file whatever its mode: refuse it as the kernel refuses anyone else.
        real_open = os.open

        def refusing_open(name: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
            if Path(name) == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
            return real_open(name, flags, mode, **kw)

        monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(StoreError, match=r"cannot open lock file .*: Permission denied$"):
        FileLock(path).acquire()


# -- locked -----------------------------------------------------------------------------------


def _is_free(path: Path) -> bool:
    probe = FileLock(path)
    if probe.acquire(blocking=False):
        probe.release()
        return True
    return False


def test_locked_holds_the_lock_for_the_block(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with locked(path):
        assert not _is_free(path)
    assert _is_free(path)


def test_locked_is_reentrant(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with locked(path):
        with locked(path):
            with locked(path, timeout_message="busy"):
                assert not _is_free(path)
            assert not _is_free(path)
        assert not _is_free(path)  # the inner exits did not drop the outer hold
    assert _is_free(path)
    assert str(path) not in files._held


def test_locked_releases_on_an_exception(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with pytest.raises(RuntimeError, match="inside"), locked(path), locked(path):
        raise RuntimeError("inside")
    assert _is_free(path)
    with locked(path, timeout_message="busy"):  # usable again
        pass


def test_locked_with_timeout_message_refuses_a_busy_lock(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    other = FileLock(path)
    other.acquire()
    try:
        with (
            pytest.raises(StoreLockedError, match="the store is busy"),
            locked(path, timeout_message="the store is busy"),
        ):
            pytest.fail("entered a lock held elsewhere")
    finally:
        other.release()
    assert str(path) not in files._held
    with locked(path, timeout_message="busy"):
        assert not _is_free(path)


def test_locked_serialises_threads(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    order: list[str] = []
    started = threading.Event()

    def other_thread() -> None:
        started.set()
        with locked(path):
            order.append("thread")

    with locked(path):
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert started.wait(30)
        order.append("main")
    thread.join(30)
    assert not thread.is_alive()
    assert order == ["main", "thread"]


_CHILD_LOCKER = """
import sys
from pathlib import Path
from typing import Any
from layerfs.store.files import FileLock, locked

path, marker = Path(sys.argv[1]), Path(sys.argv[2])
probe = FileLock(path)
if probe.acquire(blocking=False):
    print("free", flush=True)
    probe.release()
else:
    print("busy", flush=True)
with locked(path):
    print("acquired", "after-release" if marker.exists() else "too-early", flush=True)
"""


@pytest.mark.timeout(60)
def test_locked_excludes_another_process_until_released(tmp_path: Path) -> None:
    path, marker = tmp_path / "lock", tmp_path / "released"
    with contextlib.ExitStack() as stack:
        with locked(path), locked(path):
            child = stack.enter_context(spawn_python(_CHILD_LOCKER, str(path), str(marker)))
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "busy"  # it could not take the lock
            marker.write_bytes(b"")  # the last thing before letting go
        assert child.stdout.readline().split() == ["acquired", "after-release"]
        assert child.wait(30) == 0


_CHILD_HOLDER = """
import sys
from pathlib import Path
from typing import Any
from layerfs.store.files import locked

with locked(Path(sys.argv[1])):
    print("holding", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.timeout(60)
def test_a_killed_process_never_leaves_the_lock_taken(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with spawn_python(_CHILD_HOLDER, str(path)) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "holding"
        assert not _is_free(path)
        with pytest.raises(StoreLockedError), locked(path, timeout_message="held by the child"):
            pass
        child.kill()  # SIGKILL: no cleanup code runs in the child
        assert child.wait(30) == -9
    assert _is_free(path)
    with locked(path, timeout_message="should be free"):
        pass


# -- staging owners and the sweep -------------------------------------------------------------

OWNER_THEN_WAIT = """
import sys
from pathlib import Path
from typing import Any
from layerfs.store.files import make_temp_dir
path = make_temp_dir(Path(sys.argv[1]), "layer")
(path / "data").write_bytes(b"x")
print(path.name, flush=True)
sys.stdin.readline()
"""


def test_staging_of_a_live_process_is_kept_and_of_a_dead_one_swept(tmp_root: Path) -> None:
    mine = make_temp_dir(tmp_root, "layer")
    child = spawn_python(OWNER_THEN_WAIT, str(tmp_root))
    try:
        assert child.stdout is not None
        theirs = tmp_root / child.stdout.readline().strip()
        owner = theirs.name.split("-")[1]
        assert files.owner_alive(tmp_root, owner)
        assert files.stale_entries(tmp_root) == []
        assert files.sweep_stale(tmp_root) == []
        assert theirs.exists() and mine.exists()
        child.kill()
        child.wait()
        assert not files.owner_alive(tmp_root, owner)
        assert files.stale_entries(tmp_root) == [theirs]
        assert files.sweep_stale(tmp_root) == [f"tmp/{theirs.name}"]
        assert not theirs.exists() and mine.exists()
        assert not (files.owners_dir(tmp_root) / owner).exists()  # its owner file went too
        assert (files.owners_dir(tmp_root) / files.owner_name(tmp_root)).exists()
    finally:
        child.kill()
        child.communicate()


def test_entries_without_an_owner_and_of_dead_pids_are_stale(tmp_root: Path) -> None:
    (tmp_root / "stray").write_bytes(b"")
    (tmp_root / "write-notanowner-x").write_bytes(b"")
    (tmp_root / "write-2147483647-x").write_bytes(b"")  # a PID that cannot exist
    (tmp_root / f"write-{os.getpid()}-x").write_bytes(b"")  # an old-style live PID
    stale = {p.name for p in files.stale_entries(tmp_root)}
    assert stale == {"stray", "write-notanowner-x", "write-2147483647-x"}


def test_an_owner_file_swept_between_open_and_flock_is_made_again(
    tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_flock = files.fcntl.flock
    swept: list[bool] = []

    def flock_after_a_sweep(fd: int, flags: int) -> None:
        if not swept and flags == files.fcntl.LOCK_EX:
            swept.append(True)
            files.sweep_stale(tmp_root)  # finds the new file unlocked and removes it
        real_flock(fd, flags)

    monkeypatch.setattr(files, "_owners", {})
    monkeypatch.setattr(files.fcntl, "flock", flock_after_a_sweep)
    owner = files.owner_name(tmp_root)
    monkeypatch.setattr(files.fcntl, "flock", real_flock)
    assert swept == [True]
    assert files.owner_alive(tmp_root, owner)
    assert [p.name for p in files.owners_dir(tmp_root).iterdir()] == [owner]


def test_free_space_checks_name_the_path_and_the_sizes(tmp_root: Path) -> None:
    assert files.free_bytes(tmp_root) > 0
    files.check_free_space(tmp_root, 1, "load x")
    with pytest.raises(files.NoSpaceError) as caught:
        files.check_free_space(tmp_root, 1 << 60, "cannot load x")
    assert str(tmp_root) in caught.value.message
    assert "needs 1073741824.0 GiB" in caught.value.message


def test_an_enospc_becomes_a_one_line_error(tmp_root: Path) -> None:
    with (
        pytest.raises(files.NoSpaceError) as caught,
        files.reporting_no_space(tmp_root, "cannot write x", 2048),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.message == (
        f"cannot write x: no space left on the file system of {tmp_root} (2.0 KiB needed); "
        "nothing was stored"
    )
    with pytest.raises(PermissionError), files.reporting_no_space(tmp_root, "x"):
        raise PermissionError(errno.EACCES, "denied")


def test_a_long_wait_for_the_lock_names_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock_path = tmp_path / "lock"
    holder = spawn_python(HOLD_LOCK, str(lock_path))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        assert files.lock_holders(lock_path) == [holder.pid]
        monkeypatch.setenv("LAYERFS_LOCK_TIMEOUT", "0.2")
        with pytest.raises(StoreLockedError) as caught, locked(lock_path):
            pass
        assert f"process {holder.pid} (" in caught.value.message
        assert "held for over 0.2 s" in caught.value.message
    finally:
        holder.kill()
        holder.communicate()
    with locked(lock_path):  # gone with its process
        pass


HOLD_LOCK = """
import sys
from pathlib import Path
from typing import Any
from layerfs.store.files import FileLock
lock = FileLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
sys.stdin.readline()
"""


FORK_THEN_EXIT = """
import os, sys
from pathlib import Path
from typing import Any
from layerfs.store.files import make_temp_dir
path = make_temp_dir(Path(sys.argv[1]), "mount-layer")
if os.fork() == 0:  # a server going on with the staging its parent made
    print(path.name, flush=True)
    sys.stdin.readline()
    os._exit(0)
"""


def test_staging_a_forked_child_goes_on_using_outlives_its_parent(tmp_root: Path) -> None:
    parent = spawn_python(FORK_THEN_EXIT, str(tmp_root))
    try:
        assert parent.stdout is not None
        staged = tmp_root / parent.stdout.readline().strip()
        parent.wait(timeout=60)  # the parent exits; the child holds the owner lock
        assert files.sweep_stale(tmp_root) == []
        assert staged.exists()
        assert parent.stdin is not None
        parent.stdin.write("done\n")
        parent.stdin.close()
        deadline = time.monotonic() + 60
        while files.stale_entries(tmp_root) == [] and time.monotonic() < deadline:
            time.sleep(0.01)  # the child reads the line and exits
        assert files.sweep_stale(tmp_root) == [f"tmp/{staged.name}"]
        assert list(files.owners_dir(tmp_root).iterdir()) == []  # its owner file went too
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()


# -- the free-space reserve ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("4096", 4096), ("512M", 512 << 20), ("1G", 1 << 30), ("2GiB", 2 << 30),
     ("100k", 100 << 10), (" 3T ", 3 << 40)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    from layerfs.store.files import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5G", "lots", "-1", "M"])
def test_parse_size_refuses_what_is_no_size(text: str) -> None:
    from layerfs.errors import StoreError
    from layerfs.store.files import parse_size

    with pytest.raises(StoreError, match=r"LAYERFS_MIN_FREE=.* is not a size"):
        parse_size(text)


def test_the_default_reserve_is_5_percent_at_most_1_gib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layerfs.store import files

    monkeypatch.delenv("LAYERFS_MIN_FREE", raising=False)
    st = os.statvfs(tmp_path)
    assert files.reserve_bytes(tmp_path) == min(st.f_blocks * st.f_frsize // 20, 1 << 30)
    monkeypatch.setenv("LAYERFS_MIN_FREE", "7M")
    assert files.reserve_bytes(tmp_path) == 7 << 20


def test_space_guard_stops_before_the_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from layerfs.errors import NoSpaceError
    from layerfs.store import files

    free = [100 << 20]
    asked = []

    def fake_free(path: Path) -> int:
        asked.append(path)
        return free[0]

    monkeypatch.setattr(files, "free_bytes", fake_free)
    monkeypatch.setenv("LAYERFS_MIN_FREE", "40M")
    out = io.BytesIO()
    guard = files.SpaceGuard(out, tmp_path, "test layer")
    chunk = bytes(1 << 20)
    with pytest.raises(NoSpaceError) as info:
        while True:
            guard.write(chunk)
            free[0] -= len(chunk)  # what the writes cost the file system
    assert 40 << 20 <= free[0] < 42 << 20  # stopped at the reserve, not far past it
    assert out.tell() == guard.written == (100 << 20) - free[0]
    assert "test layer: stopped after writing" in info.value.message
    assert f"the file system of {tmp_path} has" in info.value.message
    assert info.value.hint is not None and "LAYERFS_MIN_FREE=20M" in info.value.hint
    assert len(asked) < 30  # statvfs is not asked for every write
    monkeypatch.setenv("LAYERFS_MIN_FREE", "0")
    files.SpaceGuard(io.BytesIO(), tmp_path, "no reserve").write(chunk)
