"""Permissions and secrets: a private store, what a normal user cannot reach through
layerfs, setuid files and device nodes on mounts, planted credential symlinks, and
no secret in anything layerfs writes.

Normal-user steps run as uid 65534 through setpriv, with a venv made from
/usr/bin/python3 that sees this checkout and the packages of its .venv (root's own
interpreter may live where that user cannot go).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import SYSTEM_PYTHON, make_user_venv, write_busybox_rootfs_tar
from tests.integration.conftest import LayerfsCli
from tests.integration.mounting import Layer, build_image
from tests.integration.test_mount_ro import mounted

if TYPE_CHECKING:
    from .conftest import RegistryFactory

pytestmark = pytest.mark.integration

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acts as root and as another user")


@contextmanager
def mounted_debug(cli: LayerfsCli, image: str, mountpoint: Path, *args: str) -> Iterator[Path]:
    """Like ``mounted``, with the global --debug (the server keeps a debug log)."""
    mountpoint.mkdir(exist_ok=True)
    cli("--debug", "mount", *args, image, mountpoint)
    try:
        yield mountpoint
    finally:
        cli("umount", mountpoint, check=False)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory under /tmp that uid 65534 may enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="layerfs-public-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        from tests.integration.conftest import unmount_all_under

        unmount_all_under(path)
        shutil.rmtree(path, ignore_errors=True)


# -- a Python for another user -----------------------------------------------------------------


@pytest.fixture(scope="session")
def user_python() -> Iterator[str]:
    """A python that uid 65534 can run: a venv of /usr/bin/python3 seeing our packages."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} is missing (apt-get install python3)")
    base = Path(tempfile.mkdtemp(prefix="layerfs-user-venv-"))
    try:
        base.chmod(0o755)
        python = make_user_venv(base)
        probe = as_nobody([python, "-c", "import layerfs, msgpack, requests, zstandard"])
        if probe.returncode != 0:
            pytest.fail(f"uid {NOBODY} cannot run layerfs from {python}: {probe.stderr!r}")
        yield python
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        capture_output=True, check=False, cwd="/", env=env, timeout=120, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[bytes], *words: str) -> str:
    assert result.returncode != 0, result
    lines = [ln for ln in result.stderr.decode().splitlines() if not ln.startswith("hint: ")]
    assert len(lines) == 1 and lines[0].startswith("layerfs: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# -- a private store -------------------------------------------------------------------------


def _open_to_others(root: Path) -> list[str]:
    found = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & 0o077:
            found.append(f"{oct(st.st_mode & 0o777)} {path.relative_to(root)}")
    return found


@pytest.mark.fuse
def test_the_store_and_everything_in_it_is_its_owners_alone(
    layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    os.umask(0o022)  # the usual umask: what layerfs makes must not depend on it
    rootfs = write_busybox_rootfs_tar(tmp_path / "rootfs.tar")
    layerfs_cli("import", rootfs, "base:1")
    layerfs_cli("save", "-o", tmp_path / "saved.tar", "base:1")
    layerfs_cli("rmi", "base:1")
    layerfs_cli("load", "-i", tmp_path / "saved.tar")
    with mounted_debug(layerfs_cli, "base:1", tmp_path / "mnt", "--rw", "--upper", "work") as mnt:
        (mnt / "made-here").write_bytes(b"x")
        layerfs_cli("commit", mnt, "base:2")
    root = layerfs_cli.root
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert _open_to_others(root) == []


def test_an_older_store_made_0711_is_tightened_on_open(layerfs_cli: LayerfsCli) -> None:
    layerfs_cli("images")
    layerfs_cli.root.chmod(0o711)
    layerfs_cli("images")
    assert stat.S_IMODE(layerfs_cli.root.stat().st_mode) == 0o700


# -- a normal user ----------------------------------------------------------------------------


@needs_root
def test_a_normal_user_cannot_reach_another_users_store_or_files(
    user_python: str, layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    rootfs = write_busybox_rootfs_tar(tmp_path / "rootfs.tar")
    layerfs_cli("import", rootfs, "secret:1")
    shared = Path(tempfile.mkdtemp(prefix="layerfs-nobody-"))
    try:
        shared.chmod(0o777)
        # Root's store, even named outright, and even in a world-readable directory.
        exposed = shared / "roots-store"
        shutil.copytree(layerfs_cli.root, exposed, symlinks=True)
        exposed.chmod(0o700)
        for command in (["images"], ["export", "secret:1"], ["save", "secret:1"],
                        ["mount", "secret:1", str(shared)]):  # fmt: skip
            result = as_nobody([user_python, "-m", "layerfs", "--root", str(exposed), *command])
            one_line_error(result, "Permission denied")
            assert b"secret" not in result.stdout
        # Files of the host it may not read, named as input to its own store.
        secret = shared / "root-only.tar"
        shutil.copy(rootfs, secret)
        secret.chmod(0o600)
        own = ["--root", str(shared / "own-store")]
        for command in (["import", str(secret), "stolen:1"], ["load", "-i", str(secret)],
                        ["mount", str(secret), str(shared / "mnt")]):  # fmt: skip
            (shared / "mnt").mkdir(exist_ok=True)
            result = as_nobody([user_python, "-m", "layerfs", *own, *command])
            one_line_error(result, "Permission denied")
        images = as_nobody([user_python, "-m", "layerfs", *own, "images", "-a", "-q"])
        assert images.returncode == 0 and images.stdout == b""
        # A layer of its own store planted as a symlink to root's file gives nothing.
        readable = shared / "readable.tar"
        shutil.copy(rootfs, readable)
        readable.chmod(0o644)
        planted = as_nobody([user_python, "-m", "layerfs", *own, "import", str(readable), "mine:1"])
        assert planted.returncode == 0, planted.stderr
        layers = shared / "own-store" / "layers"
        (tar,) = layers.glob("*/layer.tar")
        subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "ln", "-sf", str(secret), str(tar)], check=True)  # fmt: skip
        result = as_nobody([user_python, "-m", "layerfs", *own, "export", "mine:1"])
        assert result.returncode != 0 and result.stdout == b""
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# -- setuid files and device nodes on a mount ---------------------------------------------------


@needs_root
@pytest.mark.fuse
def test_setuid_and_devices_do_nothing_without_suid_and_dev(
    layerfs_cli: LayerfsCli, tmp_path: Path, public_dir: Path
) -> None:
    id_program = shutil.which("id")
    assert id_program
    layer = Layer(tmp_path / "0.tar").dir("bin").dir("dev")
    layer.file("bin/id", Path(id_program).read_bytes(), mode=0o4755)  # setuid root
    layer.add("dev/null", b"3", mode=0o666, dev=(1, 3)).close()
    build_image(layerfs_cli.root, [layer.path], "suid:1")
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    for options, euid, dev_ok in (
        (["-o", "allow_other"], str(NOBODY), False),
        (["-o", "allow_other", "--suid", "--dev"], "0", True),
    ):
        with mounted(layerfs_cli, "suid:1", public_dir / "mnt", *options) as mnt:
            assert os.stat(mnt / "bin/id").st_mode & stat.S_ISUID  # it is there...
            ran = subprocess.run([*drop, str(mnt / "bin/id"), "-u"], capture_output=True,
                                 check=True)  # fmt: skip
            assert ran.stdout.decode().strip() == euid  # ...and works only with --suid
            try:
                with open(mnt / "dev/null", "wb") as null:
                    null.write(b"into the device")
                opened = True
            except PermissionError:
                opened = False
            assert opened == dev_ok


# -- credentials -------------------------------------------------------------------------------


@needs_root
def test_a_credentials_symlink_planted_by_someone_else_is_not_followed(
    layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    secret = tmp_path / "roots-real-config.json"
    auth = base64.b64encode(b"root:hunter2-root-password").decode()
    secret.write_text(json.dumps({"auths": {"127.0.0.1:1": {"auth": auth}}}))
    secret.chmod(0o600)
    config = tmp_path / "docker-config"
    config.mkdir()
    link = config / "config.json"
    link.symlink_to(secret)
    os.lchown(link, NOBODY, NOBODY)  # planted by uid 65534
    env = {"DOCKER_CONFIG": str(config)}
    result = layerfs_cli("pull", "--timeout", "1", "--retries", "0", "127.0.0.1:1/x:1",
                         env=env, check=False)  # fmt: skip
    assert result.returncode != 0
    text = result.stderr.decode()
    assert f"{link} is a symlink owned by uid {NOBODY}" in text and "not followed" in text
    assert "hunter2" not in text
    login = layerfs_cli("login", "-u", "me", "--password-stdin", "127.0.0.1:1", input=b"pw",
                        env=env, check=False)  # fmt: skip
    one_line_error(login, "not followed")
    assert json.loads(secret.read_text())["auths"]["127.0.0.1:1"]["auth"] == auth  # unwritten
    # A symlink of this user's own (a dotfile manager's) is followed as before.
    os.lchown(link, 0, 0)
    from layerfs.registry.credentials import DockerConfig

    creds = DockerConfig(link).get("127.0.0.1:1")
    assert creds is not None and creds.password == "hunter2-root-password"


# -- no secret in anything written -----------------------------------------------------------


@needs_root
@pytest.mark.registry
@pytest.mark.fuse
@pytest.mark.parametrize("kind", ["tls-basic", "token"])
def test_no_secret_in_output_logs_or_the_store(
    kind: str, registry_server: RegistryFactory, layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    from tests.integration import test_registry as reg

    tokens: list[str] = []
    config = tmp_path / "docker-config"
    env = {"DOCKER_CONFIG": str(config)}
    args: list[str] = []
    token_server = None
    try:
        if kind == "tls-basic":
            htpasswd = tmp_path / "htpasswd"
            htpasswd.write_bytes(reg._run([reg._need("htpasswd", "apache2-utils"), "-Bbn",
                                           reg.USER, reg.PASSWORD]).stdout)  # fmt: skip
            ca, cert, key = reg.make_ca(tmp_path)
            registry = registry_server(tls=(cert, key), htpasswd=htpasswd)
            args = ["--ca-cert", str(ca)]
        else:
            token_server = reg.TokenServer(tmp_path)
            sign = token_server.sign

            def recording(access: list[dict[str, object]]) -> str:
                tokens.append(sign(access))
                return tokens[-1]

            token_server.sign = recording  # type: ignore[method-assign]
            registry = registry_server(token={
                "realm": token_server.realm, "service": reg.SERVICE, "issuer": reg.ISSUER,
                "rootcertbundle": token_server.cert,
            })  # fmt: skip
        name = f"{registry.host}/secret/app:1"
        outputs = [
            layerfs_cli("--debug", "login", "-u", reg.USER, "--password-stdin", *args,
                        registry.host, input=reg.PASSWORD.encode(), env=env),
            layerfs_cli("import", write_busybox_rootfs_tar(tmp_path / "rootfs.tar"), name),
            layerfs_cli("--debug", "push", *args, name, env=env),
            layerfs_cli("rmi", name),
            layerfs_cli("--debug", "pull", *args, name, env=env),
            # A failing request in debug mode prints a traceback: it must not carry one either.
            layerfs_cli("--debug", "pull", *args, f"{registry.host}/secret/nothing:1", env=env,
                        check=False),
            layerfs_cli("--debug", "login", "-u", reg.USER, "--password-stdin", *args,
                        registry.host, input=b"wrong-" + reg.PASSWORD.encode(), env=env,
                        check=False),
        ]  # fmt: skip
        with mounted_debug(layerfs_cli, name, tmp_path / "mnt") as mnt:
            assert (mnt / "bin").is_dir()
        if kind == "token":
            assert tokens, "the token server issued no token"
    finally:
        if token_server is not None:
            token_server.stop()
    secrets = {
        "password": reg.PASSWORD.encode(),
        "basic": base64.b64encode(f"{reg.USER}:{reg.PASSWORD}".encode()),
        **{f"token {i}": t.encode() for i, t in enumerate(tokens)},
        **{f"token {i} signature": t.rsplit(".", 1)[1].encode() for i, t in enumerate(tokens)},
    }
    written = {f"output {i}": r.stdout + r.stderr for i, r in enumerate(outputs)}
    assert any(b"DEBUG" in text for text in written.values())  # --debug did speak
    for path in layerfs_cli.root.rglob("*"):  # every file of the store: logs, records...
        if path.is_file() and not path.is_symlink():
            written[str(path)] = path.read_bytes()
    assert any("/logs/" in name for name in written)  # the mount's debug log is among them
    assert _open_to_others(layerfs_cli.root) == []  # registry records and mount logs too
    leaks = [(name, what) for name, text in written.items() for what, secret in secrets.items()
             if secret in text]  # fmt: skip
    assert leaks == []
