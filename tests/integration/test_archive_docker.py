"""docker save → layerfs-load and layerfs-save → docker load, against the real Docker engine.

The images are built in Docker from files made here: ``docker import`` of a busybox root
filesystem (with a file carrying xattrs), then ``docker build`` with RUN steps that
delete lower files, replace directories (opaque directories) and files, make hardlinks,
symlinks, FIFOs, device nodes, setuid/setgid/sticky modes and odd owners, plus a COPY
of a file. The file capability (security.capability, the one xattr Docker's layer
producer keeps) comes with ``docker import``; COPY from a build context drops xattrs.
No network is needed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.helpers import BUSYBOX, write_busybox_rootfs_tar

if TYPE_CHECKING:
    from .conftest import DockerEngine, LayerfsCli

pytestmark = [pytest.mark.integration, pytest.mark.docker]

REPO = "layerfs-archive-test"
NAMES = {"base": f"{REPO}/base:1", "built": f"{REPO}/built:1", "two": f"{REPO}/two:1"}
NAMES["child"] = f"{REPO}/child:1"
LONG_DIR = "/data/" + "/".join(["a-rather-long-directory-name"] * 5)

DOCKERFILE = f"""\
FROM {NAMES["base"]}
ENV A=1 B="<x&y>"
LABEL org.example.name="layerfs test" b=2
RUN mkdir -p /data/sub /data/gone /replace/dir {LONG_DIR} \\
 && echo hello > /data/f && echo bye > /data/gone/x && echo keep > /data/keep \\
 && ln /data/keep /data/hard && ln -s f /data/sym && ln -s /nonexistent /data/dangling \\
 && echo old > /replace/dir/old && echo file > /replace/file \\
 && touch '/data/ünïcödé name' {LONG_DIR}/file
RUN rm -rf /data/gone /data/sym /etc/group /replace/dir /replace/file \\
 && mkdir /replace/dir /replace/file && echo new > /replace/dir/new \\
 && mkfifo /data/fifo && mknod /data/null c 1 3 && mknod /data/loop b 7 0 \\
 && chmod 4755 /data/f && chmod 3777 /data/sub && chown 1234:5678 /data/keep \\
 && chown -h 65534:65534 /data/dangling && ln /data/f /data/f-link
COPY capped /data/capped
EXPOSE 80/tcp 53/udp
VOLUME /vol
HEALTHCHECK --interval=5s CMD true
WORKDIR /data
STOPSIGNAL SIGTERM
CMD ["sh", "-c", "cat /data/f"]
"""

# What a container's init layer adds (FORMATS §4); docker export shows it, an image has none.
INIT_PATHS = {
    ".dockerenv",
    ".dockerinit",
    "etc/hostname",
    "etc/hosts",
    "etc/resolv.conf",
    "etc/mtab",
    "dev/console",
    "dev/pts",
    "dev/shm",
}
INIT_DIRS = {"dev", "proc", "sys", "etc"}  # made by the init layer when the image has none


def _capability() -> bytes:
    """A valid security.capability value: VFS_CAP_REVISION_2, effective, cap_net_raw (13)."""
    return struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)


def _base_rootfs(path: Path, capability: bytes) -> None:
    """The busybox root filesystem plus a file with xattrs (a capability and a user note)."""
    flat = write_busybox_rootfs_tar(path.with_suffix(".flat"))
    with tarfile.open(flat) as src, tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as out:
        for member in src.getmembers():
            out.addfile(member, src.extractfile(member) if member.isfile() else None)
        info = tarfile.TarInfo("bin/capped")
        info.size, info.mode, info.mtime = 3, 0o755, 1_700_000_000
        info.pax_headers = {
            "SCHILY.xattr.security.capability": capability.decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.user.note": "kept byte for byte",
        }
        out.addfile(info, io.BytesIO(b"cap"))
    flat.unlink()


@pytest.fixture(scope="module")
def images(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Build the test images in Docker; returns name -> image ID."""
    if not BUSYBOX.exists():
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    work = tmp_path_factory.mktemp("docker-images")
    capability = _capability()
    _base_rootfs(work / "rootfs.tar", capability)
    docker_engine.run("import", work / "rootfs.tar", NAMES["base"])
    context = work / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "capped").write_bytes(b"capped\n")
    docker_engine.run("build", "--network", "none", "-q", "-t", NAMES["built"], context)
    for name, step in (("two", "RUN echo two > /two"), ("child", "RUN echo child > /child")):
        ctx = work / name
        ctx.mkdir()
        base = NAMES["base"] if name == "two" else NAMES["built"]
        (ctx / "Dockerfile").write_text(f"FROM {base}\n{step}\n")
        docker_engine.run("build", "--network", "none", "-q", "-t", NAMES[name], ctx)
    return {key: _docker_id(docker_engine, name) for key, name in NAMES.items()}


def _docker_id(engine: DockerEngine, name: str) -> str:
    return engine.run("image", "inspect", "--format", "{{.Id}}", name).stdout.decode().strip()


def _docker_layers(engine: DockerEngine, name: str) -> list[str]:
    out = engine.run("image", "inspect", "--format", "{{json .RootFS.Layers}}", name).stdout
    return list(json.loads(out))


def _tool(name: str) -> list[str]:
    """The stand-alone entry point (layerfs-load/-save) of this interpreter's install."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    command = name.removeprefix("layerfs-")
    return [
        sys.executable,
        "-c",
        f"import sys; from layerfs.cli import {command}_main as m; sys.exit(m())",
    ]


def _run(argv: list[str], *, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        timeout=300,
        stdin=subprocess.DEVNULL if input is None else None,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def _layerfs_inspect(cli: LayerfsCli, name: str) -> dict[str, Any]:
    return json.loads(cli("inspect", name).stdout)[0]


# -- listings -----------------------------------------------------------------------------


def listing(data: bytes) -> dict[str, tuple[Any, ...]]:
    """path -> (type, mode, uid, gid, size, sha256, link target, device, capability).

    Hardlinks are resolved to what they point at and marked with the set of their names,
    so the order a producer chose (which name carries the data) does not matter.
    """
    entries: dict[str, tuple[Any, ...]] = {}
    links: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            name = member.name.removeprefix("./").rstrip("/")
            if not name:
                continue
            if member.islnk():
                links[name] = member.linkname.removeprefix("./").rstrip("/")
                continue
            digest = ""
            if member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                digest = hashlib.sha256(handle.read()).hexdigest()
            kind = {
                tarfile.REGTYPE: "file",
                tarfile.AREGTYPE: "file",
                tarfile.DIRTYPE: "dir",
                tarfile.SYMTYPE: "symlink",
                tarfile.CHRTYPE: "char",
                tarfile.BLKTYPE: "block",
                tarfile.FIFOTYPE: "fifo",
            }[member.type]
            capability = member.pax_headers.get("SCHILY.xattr.security.capability", "")
            entries[name] = (
                kind,
                member.mode & 0o7777,
                member.uid,
                member.gid,
                member.size if kind == "file" else 0,
                digest,
                member.linkname if kind == "symlink" else "",
                (member.devmajor, member.devminor) if kind in ("char", "block") else None,
                capability,
            )
    groups: dict[str, set[str]] = {}
    for name, target in links.items():
        groups.setdefault(target, {target}).add(name)
    for target, names in groups.items():
        for name in names:
            entries[name] = (*entries[target], tuple(sorted(names)))
    return entries


def without_init(docker: dict[str, tuple[Any, ...]], image: dict[str, tuple[Any, ...]]):
    result = {}
    for path, entry in docker.items():
        top = path.split("/", 1)[0]
        if path in INIT_PATHS or any(path.startswith(p + "/") for p in INIT_PATHS):
            continue
        if top in INIT_DIRS and top not in image and (path == top or top in ("proc", "sys")):
            continue
        result[path] = entry
    return result


def _drop_init_from_image(image: dict[str, tuple[Any, ...]]):
    return {p: e for p, e in image.items() if p not in INIT_PATHS}


# -- tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_saved(
    docker_engine: DockerEngine, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("docker-saved") / "all.tar"
    docker_engine.run("save", "-o", path, *NAMES.values())
    return path


def test_docker_save_then_layerfs_load_keeps_ids_and_digests(
    docker_engine: DockerEngine, images: dict[str, str], docker_saved: Path, layerfs_cli: LayerfsCli
) -> None:
    result = _run(
        [*_tool("layerfs-load"), "--root", str(layerfs_cli.root), "-i", str(docker_saved)]
    )

    assert sorted(result.stdout.decode().splitlines()) == sorted(
        f"Loaded image: {name}" for name in NAMES.values()
    )
    for key, name in NAMES.items():
        document = _layerfs_inspect(layerfs_cli, name)
        assert document["Id"] == images[key]
        assert document["RootFS"]["Layers"] == _docker_layers(docker_engine, name)
    assert b"clean" in layerfs_cli("fsck").stdout


def test_docker_save_gzipped_on_standard_input(
    images: dict[str, str], docker_saved: Path, layerfs_cli: LayerfsCli
) -> None:
    data = gzip.compress(docker_saved.read_bytes(), compresslevel=1)

    _run([*_tool("layerfs-load"), "--root", str(layerfs_cli.root), "-q"], input=data)

    for key, name in NAMES.items():
        assert _layerfs_inspect(layerfs_cli, name)["Id"] == images[key]


@pytest.mark.parametrize("key", ["built", "child", "two"])
def test_layerfs_export_lists_what_docker_export_lists(
    docker_engine: DockerEngine,
    images: dict[str, str],
    docker_saved: Path,
    layerfs_cli: LayerfsCli,
    key: str,
) -> None:
    layerfs_cli("load", "-q", "-i", docker_saved)
    container = docker_engine.run("create", NAMES[key], "sh").stdout.decode().strip()
    try:
        docker_listing = listing(docker_engine.run("export", container).stdout)
    finally:
        docker_engine.run("rm", container)

    ours = listing(layerfs_cli("export", NAMES[key]).stdout)

    assert without_init(docker_listing, ours) == _drop_init_from_image(ours)
    if key == "built":
        # The imported file keeps its capability xattr (Docker's COPY drops xattrs).
        assert ours["bin/capped"][8] != "" and ours["data/capped"][0] == "file"
        assert ours["data/f"][0] == "file" and ours["data/f"][1] == 0o4755
        assert ours["data/null"][7] == (1, 3)
        assert "replace/dir/old" not in ours and "replace/dir/new" in ours
        assert "etc/group" not in ours and "data/gone" not in ours
        assert ours["data/keep"][2:4] == (1234, 5678)
        assert ours[LONG_DIR.lstrip("/") + "/file"][0] == "file"


def test_layerfs_save_then_docker_load_and_run(
    fresh_docker_engine: DockerEngine,
    images: dict[str, str],
    docker_saved: Path,
    layerfs_cli: LayerfsCli,
) -> None:
    layerfs_cli("load", "-q", "-i", docker_saved)
    ours = layerfs_cli.root.parent / "ours.tar"
    result = _run(
        [*_tool("layerfs-save"), "--root", str(layerfs_cli.root), "-o", str(ours), *NAMES.values()]
    )
    assert result.stdout.decode().splitlines() == [f"Saved image: {n}" for n in NAMES.values()]

    # The same files with the same bytes as docker save wrote (order and tar headers aside).
    assert _archive_content(ours) == _archive_content(docker_saved)

    # A fresh engine, which never had any of these images or layers, loads ours and
    # gets the same IDs.
    docker = fresh_docker_engine
    assert docker.run("images", "-q").stdout == b""
    loaded = docker.run("load", "-i", ours).stdout.decode().splitlines()
    assert sorted(loaded) == sorted(f"Loaded image: {n}" for n in NAMES.values())
    for key, name in NAMES.items():
        assert _docker_id(docker, name) == images[key]
    out = docker.run("run", "--rm", "--network", "none", NAMES["built"]).stdout
    assert out == b"hello\n"


def test_layerfs_save_oci_format_loads_into_docker(
    docker_engine: DockerEngine, images: dict[str, str], docker_saved: Path, layerfs_cli: LayerfsCli
) -> None:
    layerfs_cli("load", "-q", "-i", docker_saved)
    ours = layerfs_cli.root.parent / "oci.tar"
    layerfs_cli("save", "-q", "--format", "oci", "-o", ours, NAMES["two"])

    docker_engine.run("rmi", NAMES["two"])
    docker_engine.run("load", "-i", ours)

    assert _docker_id(docker_engine, NAMES["two"]) == images["two"]
    out = docker_engine.run("run", "--rm", "--network", "none", NAMES["two"], "cat", "/two").stdout
    assert out == b"two\n"


def _archive_content(path: Path) -> dict[str, Any]:
    """Every member of a docker-archive by name: the hash of its bytes (a symlinked layer
    resolved: which copy Docker writes first depends on its map order), manifest parsed."""
    content: dict[str, Any] = {}
    links: dict[str, str] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            name = member.name.rstrip("/")
            if member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                data = handle.read()
                if name == "manifest.json":
                    content[name] = sorted(json.loads(data), key=lambda e: e["Config"])
                elif name == "repositories":
                    content[name] = json.loads(data)
                else:
                    content[name] = hashlib.sha256(data).hexdigest()
            elif member.issym():
                links[name] = os.path.normpath(os.path.join(os.path.dirname(name), member.linkname))
            elif member.isdir():
                content[name] = "dir"
    for name, target in links.items():
        content[name] = content[target]
    return content


@pytest.fixture(autouse=True)
def _no_stray_containers(docker_engine: DockerEngine) -> Iterator[None]:
    yield
    stray = docker_engine.run("ps", "-aq").stdout.decode().split()
    if stray:
        docker_engine.run("rm", "-f", *stray)
