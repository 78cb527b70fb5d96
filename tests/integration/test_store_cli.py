"""The store through the real command line: import, export, images, tag, rmi, history,
inspect, fsck and gc, bad input, SIGKILL at random moments, and concurrent processes."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    build_tar,
    free_port,
    tar_file,
    tar_member,
    write_busybox_rootfs_tar,
)
from tests.integration.conftest import LayerfsCli

pytestmark = pytest.mark.integration


def _listing(tar_bytes: bytes) -> dict[str, tuple[str, int, int, int, str, str]]:
    """name → (type, mode, uid, gid, sha256 of content, link target)."""
    result = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            name = member.name.removeprefix("./").rstrip("/")
            if not name:
                continue
            data = tar.extractfile(member).read() if member.isreg() else b""  # type: ignore[union-attr]
            result[name] = (
                member.type.decode(),
                member.mode,
                member.uid,
                member.gid,
                hashlib.sha256(data).hexdigest(),
                member.linkname,
            )
    return result


@pytest.fixture
def rootfs_tar(tmp_path: Path) -> Path:
    return write_busybox_rootfs_tar(tmp_path / "rootfs.tar")


def _image_id(out: bytes) -> str:
    line = out.decode().strip().splitlines()[-1]
    assert line.startswith("sha256:") and len(line) == 71, line
    return line[7:]


def test_import_inspect_history_export_round_trip(
    layerfs_cli: LayerfsCli, rootfs_tar: Path
) -> None:
    out = layerfs_cli(
        "import",
        "-m",
        "first import",
        "-c",
        'CMD ["/bin/sh"]',
        "-c",
        "ENV A=1 B=2",
        "-c",
        "WORKDIR /root",
        "-c",
        "USER nobody",
        "-c",
        "LABEL org.example=yes",
        "-c",
        "EXPOSE 8080/udp",
        "-c",
        "ENTRYPOINT /bin/sh -c",
        rootfs_tar,
        "demo/busybox:1.0",
    ).stdout
    image_id = _image_id(out)
    images = layerfs_cli("images", "--no-trunc", "--format", "json").stdout.decode().splitlines()
    rows = [json.loads(line) for line in images]
    assert [(r["Repository"], r["Tag"], r["ID"]) for r in rows] == [
        ("demo/busybox", "1.0", "sha256:" + image_id)
    ]
    doc = json.loads(layerfs_cli("inspect", "demo/busybox:1.0").stdout)[0]
    assert doc["Id"] == "sha256:" + image_id
    assert doc["RepoTags"] == ["demo/busybox:1.0"]
    assert doc["Comment"] == "first import"
    assert doc["Config"]["Cmd"] == ["/bin/sh"]
    assert doc["Config"]["Env"] == ["A=1", "B=2"]
    assert doc["Config"]["WorkingDir"] == "/root"
    assert doc["Config"]["User"] == "nobody"
    assert doc["Config"]["Labels"] == {"org.example": "yes"}
    assert doc["Config"]["ExposedPorts"] == {"8080/udp": {}}
    assert doc["Config"]["Entrypoint"] == ["/bin/sh", "-c", "/bin/sh -c"]
    diff_id = "sha256:" + hashlib.sha256(rootfs_tar.read_bytes()).hexdigest()
    assert doc["RootFS"]["Layers"] == [diff_id]
    # The image ID is the digest of the stored config, as Docker computes it.
    config = (layerfs_cli.root / "graph" / image_id / "json").read_bytes()
    assert hashlib.sha256(config).hexdigest() == image_id
    history = layerfs_cli("history", "--no-trunc", "--format", "json", "demo/busybox:1.0").stdout
    entries = [json.loads(line) for line in history.decode().splitlines()]
    assert [(e["ID"], e["Comment"]) for e in entries] == [("sha256:" + image_id, "first import")]
    # The stored layer is the imported tar, byte for byte.
    layer_tar = layerfs_cli.root / "layers" / diff_id[7:] / "layer.tar"
    assert layer_tar.read_bytes() == rootfs_tar.read_bytes()
    exported = layerfs_cli("export", "demo/busybox:1.0").stdout
    assert _listing(exported) == _listing(rootfs_tar.read_bytes())
    out_file = layerfs_cli.root.parent / "export.tar"
    layerfs_cli("export", "-o", out_file, image_id[:12])
    assert out_file.read_bytes() == exported
    assert layerfs_cli("fsck").returncode == 0


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_import_compressed_from_stdin(
    layerfs_cli: LayerfsCli, rootfs_tar: Path, compress: str
) -> None:
    raw = rootfs_tar.read_bytes()
    data = subprocess.run([compress, "-c"], input=raw, capture_output=True, check=True).stdout
    image_id = _image_id(layerfs_cli("import", "-", "stdin/img", input=data).stdout)
    doc = json.loads(layerfs_cli("inspect", "stdin/img").stdout)[0]
    assert doc["Id"] == "sha256:" + image_id
    assert doc["RootFS"]["Layers"] == ["sha256:" + hashlib.sha256(raw).hexdigest()]
    assert doc["Comment"] == "Imported from -"


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    directory = tmp_path / "www"
    directory.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_import_from_url(
    layerfs_cli: LayerfsCli, rootfs_tar: Path, http_server: str, tmp_path: Path
) -> None:
    (tmp_path / "www" / "rootfs.tar.gz").write_bytes(gzip.compress(rootfs_tar.read_bytes()))
    url = http_server + "rootfs.tar.gz"
    layerfs_cli("import", url, "web/img:v1")
    doc = json.loads(layerfs_cli("inspect", "web/img:v1").stdout)[0]
    assert doc["Comment"] == f"Imported from {url}"
    missing = layerfs_cli("import", http_server + "nope.tar", check=False)
    assert missing.returncode != 0
    assert b"404" in missing.stderr and len(missing.stderr.decode().strip().splitlines()) == 1


def test_tag_rmi_and_untag_semantics(layerfs_cli: LayerfsCli, rootfs_tar: Path) -> None:
    image_id = _image_id(layerfs_cli("import", rootfs_tar, "a/one:latest").stdout)
    layerfs_cli("tag", "a/one", "b/two:x")
    # As today's docker: an existing tag moves (and -f is still accepted), silently.
    moved = layerfs_cli("tag", "a/one", "b/two:x")
    assert (moved.stdout, moved.stderr) == (b"", b"")
    assert layerfs_cli("tag", "-f", "a/one", "b/two:x").returncode == 0
    # An ID naming images in two repositories needs -f.
    refused = layerfs_cli("rmi", image_id[:12], check=False)
    assert refused.returncode != 0 and b"must be forced" in refused.stderr
    # Removing one name only untags.
    out = layerfs_cli("rmi", "b/two:x").stdout.decode()
    assert out.strip() == "Untagged: b/two:x"
    out = layerfs_cli("rmi", "a/one").stdout.decode().splitlines()
    diff_id = "sha256:" + hashlib.sha256(rootfs_tar.read_bytes()).hexdigest()
    assert out == ["Untagged: a/one:latest", f"Deleted: sha256:{image_id}", f"Deleted: {diff_id}"]
    assert layerfs_cli("images", "-q").stdout == b""
    assert list((layerfs_cli.root / "layers").iterdir()) == []
    missing = layerfs_cli("rmi", "a/one", check=False)
    assert missing.returncode != 0
    assert missing.stderr.decode().strip() == "layerfs: error: No such image: a/one"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../escape", "escapes the root"),
        ("/../escape", "escapes the root"),  # an absolute name loses its "/", not its ".."
    ],
)
def test_unsafe_tarball_is_refused_and_nothing_is_written(
    layerfs_cli: LayerfsCli, tmp_path: Path, name: str, expected: str
) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(build_tar(tar_file("fine"), tar_file(name, b"evil")))
    result = layerfs_cli("import", bad, "bad/img", check=False)
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: error: ") and expected in lines[0]
    assert list(canary.iterdir()) == []
    assert not (tmp_path / "escape").exists()
    assert layerfs_cli("images", "-a", "-q").stdout == b""
    assert layerfs_cli("fsck").returncode == 0


def test_symlink_write_through_and_bad_hardlinks_are_refused(
    layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    cases = {
        "through": [("link", tarfile.SYMTYPE, "/etc"), ("link/passwd", tarfile.REGTYPE, "")],
        "outside": [("h", tarfile.LNKTYPE, "../../etc/passwd")],
        "later": [("h", tarfile.LNKTYPE, "later"), ("later", tarfile.REGTYPE, "")],
        "whiteout": [(".wh.gone", tarfile.REGTYPE, ""), ("h", tarfile.LNKTYPE, ".wh.gone")],
    }
    for label, entries in cases.items():
        path = tmp_path / f"{label}.tar"
        members = [tar_member(entry, kind, linkname=link) for entry, kind, link in entries]
        path.write_bytes(build_tar(*members))
        result = layerfs_cli("import", path, f"bad/{label}", check=False)
        assert result.returncode != 0, label
        assert len(result.stderr.decode().strip().splitlines()) == 1, result.stderr
    assert layerfs_cli("images", "-a", "-q").stdout == b""
    assert layerfs_cli("fsck").returncode == 0


def test_truncated_corrupt_and_non_tar_inputs(
    layerfs_cli: LayerfsCli, rootfs_tar: Path, tmp_path: Path
) -> None:
    raw = rootfs_tar.read_bytes()
    inputs = {
        "truncated.tar": raw[: len(raw) // 2],
        "truncated.tar.gz": gzip.compress(raw)[:5000],
        "notatar.txt": b"hello, this is not a tarball\n" * 40,
        "corrupt.tar": raw[:600] + b"\xff" * 50 + raw[650:],
        "empty.tar": b"",
    }
    for filename, data in inputs.items():
        path = tmp_path / filename
        path.write_bytes(data)
        result = layerfs_cli("import", path, "bad/img", check=False)
        assert result.returncode != 0, filename
        err = result.stderr.decode().strip().splitlines()
        assert len(err) == 1 and err[0].startswith("layerfs: error: "), (filename, err)
        assert b"Traceback" not in result.stderr
    assert layerfs_cli("images", "-a", "-q").stdout == b""
    assert layerfs_cli("fsck").returncode == 0


def test_decompression_bomb_is_capped(layerfs_cli: LayerfsCli, tmp_path: Path) -> None:
    # A tar holding 64 MiB of zeros, gzipped to ~64 KiB. With a lowered cap it is a bomb.
    bomb = tmp_path / "bomb.tar.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as out, tarfile.open(fileobj=out, mode="w|") as t:
        info = tarfile.TarInfo("zeros")
        info.size = 64 << 20
        t.addfile(info, io.BytesIO(bytes(64 << 20)))
    env = {"LAYERFS_MAX_EXPANSION_RATIO": "50", "LAYERFS_EXPANSION_FREE_BYTES": "1048576"}
    result = layerfs_cli("import", bomb, "bomb/img", check=False, env=env)
    assert result.returncode != 0
    assert b"decompression bomb" in result.stderr
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert layerfs_cli("images", "-a", "-q").stdout == b""
    assert layerfs_cli("fsck").returncode == 0
    # The default cap (100x past 16 MiB) takes 64 MiB of zeros in 64 KiB for a bomb too;
    # a layer that really is that empty goes in with the cap lifted.
    result = layerfs_cli("import", bomb, "zeros/img", check=False)
    assert result.returncode != 0 and b"LAYERFS_MAX_EXPANSION_RATIO" in result.stderr
    lifted = {"LAYERFS_MAX_EXPANSION_RATIO": "0"}
    assert layerfs_cli("import", bomb, "zeros/img", env=lifted).returncode == 0


def _big_rootfs(path: Path, files: int = 400, size: int = 128 << 10) -> Path:
    rng = random.Random(7)
    with tarfile.open(path, "w") as tar:
        for i in range(files):
            info = tarfile.TarInfo(f"data/{i // 50}/file{i}")
            info.size = size
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
    return path


def test_sigkill_during_import_leaves_nothing_half_done(
    layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    source = _big_rootfs(tmp_path / "big.tar")
    rng = random.Random(1234)
    command = layerfs_cli.argv("import", source, "kill/img:latest")
    layerfs_cli("images")  # creates the store
    for _ in range(8):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tags = (
            json.loads((layerfs_cli.root / "repositories.json").read_bytes() or b"{}")
            if (layerfs_cli.root / "repositories.json").exists()
            else {}
        )
        images = layerfs_cli("images", "-a", "--format", "json").stdout.decode().splitlines()
        if images:
            # The kill came after publication: then the image is whole and tagged.
            assert len(images) == 1
            assert json.loads(images[0])["Repository"] == "kill/img"
            layerfs_cli("rmi", "kill/img")
        else:
            assert not tags.get("Repositories", {}).get("kill/img")
        # Whatever the kill interrupted was settled by the next command: no --repair needed.
        fsck = layerfs_cli("fsck", "--verify", check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert sorted(os.listdir(layerfs_cli.root / "tmp")) == []
    layerfs_cli("import", source, "kill/img:latest")
    assert layerfs_cli("fsck").returncode == 0
    assert len(layerfs_cli("images", "-q").stdout.splitlines()) == 1


def test_two_processes_import_the_same_tarball(layerfs_cli: LayerfsCli, tmp_path: Path) -> None:
    source = _big_rootfs(tmp_path / "same.tar", files=200)
    layerfs_cli("images")
    base = [sys.executable, "-m", "layerfs", "--root", str(layerfs_cli.root), "import", str(source)]
    procs = [
        subprocess.Popen([*base, f"twin/{n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for n in ("a", "b")
    ]
    results = [(*p.communicate(timeout=120), p.returncode) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    assert len(list((layerfs_cli.root / "layers").iterdir())) == 1
    tags = json.loads((layerfs_cli.root / "repositories.json").read_bytes())["Repositories"]
    assert set(tags) == {"twin/a", "twin/b"}
    assert layerfs_cli("fsck").returncode == 0


def test_images_never_fails_while_rmi_runs(layerfs_cli: LayerfsCli, tmp_path: Path) -> None:
    names = []
    for i in range(6):
        tar_path = tmp_path / f"r{i}.tar"
        tar_path.write_bytes(build_tar(tar_file(f"file{i}", b"x")))
        layerfs_cli("import", tar_path, f"many/img{i}")
        names.append(f"many/img{i}")
    remover = subprocess.Popen(
        [sys.executable, "-m", "layerfs", "--root", str(layerfs_cli.root), "rmi", *names],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    listings = 0
    while remover.poll() is None or listings < 3:
        result = layerfs_cli("images", check=False)
        assert result.returncode == 0, result.stderr
        listings += 1
    assert remover.wait() == 0
    assert layerfs_cli("images", "-a", "-q").stdout == b""


HOLDER = """
import sys, time
from pathlib import Path
from layerfs.store.store import Store
store = Store.open(Path(sys.argv[1]))
image = store.tags.lookup_image(sys.argv[2])
store.graph.retain("holder", image.id, image.layer)
print("held", flush=True)
time.sleep(600)
"""


def test_a_held_image_cannot_be_deleted_by_another_process(
    layerfs_cli: LayerfsCli, rootfs_tar: Path
) -> None:
    layerfs_cli("import", rootfs_tar, "held/img")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(layerfs_cli.root), "held/img"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        refused = layerfs_cli("rmi", "held/img", check=False)
        assert refused.returncode != 0
        assert b"held by an ongoing pull, load or mount" in refused.stderr
        assert layerfs_cli("images", "-q").stdout.strip() != b""
    finally:
        holder.kill()
        holder.communicate()
    # The hold died with its process.
    assert layerfs_cli("rmi", "held/img").returncode == 0


def test_errors_are_one_line_and_debug_shows_the_traceback(layerfs_cli: LayerfsCli) -> None:
    result = layerfs_cli("inspect", "nope/nothing", check=False)
    assert result.returncode == 1
    assert result.stderr.decode() == "layerfs: error: No such image: nope/nothing\n"
    result = layerfs_cli("--debug", "inspect", "nope/nothing", check=False)
    assert b"Traceback" in result.stderr
    result = layerfs_cli("tag", "nope", "Bad:Name", check=False)
    assert result.returncode == 2
    assert len(result.stderr.decode().strip().splitlines()) == 1
    result = layerfs_cli("export", "nope", check=False)
    assert result.returncode != 0


def test_gc_removes_unreferenced_layers(layerfs_cli: LayerfsCli, rootfs_tar: Path) -> None:
    layerfs_cli("import", rootfs_tar, "gc/img")
    layerfs_cli("rmi", "--no-prune", "gc/img")
    assert layerfs_cli("gc").returncode == 0
    assert list((layerfs_cli.root / "layers").iterdir()) == []
    assert layerfs_cli("fsck").returncode == 0


def test_fsck_right_after_kill_9_of_a_125_layer_load_is_clean(
    layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    from tests.archive_builders import docker_members, make_image, make_layer, pack

    layers = [make_layer(f"l{i}", ("data", os.urandom(4096))) for i in range(125)]
    archive = tmp_path / "deep.tar"
    archive.write_bytes(pack(docker_members([make_image(layers, ["deep/img:1"])])))
    layerfs_cli("images")
    command = [sys.executable, "-m", "layerfs", "--root", str(layerfs_cli.root), "load"]
    rng = random.Random(125)
    for _ in range(4):
        proc = subprocess.Popen(
            [*command, "-i", str(archive)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.2, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fsck = layerfs_cli("fsck", check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert b"clean" in fsck.stdout
        images = layerfs_cli("images", "-a", "-q").stdout.split()
        assert len(images) in (0, 125)  # the whole chain with its tag, or nothing
        if images:
            layerfs_cli("rmi", "deep/img:1")
    out = layerfs_cli("load", "-i", archive).stdout.decode()
    assert out.splitlines()[-1] == "Loaded image: deep/img:1"
    assert layerfs_cli("fsck", "--verify").returncode == 0


def test_two_processes_tagging_one_name_take_turns(layerfs_cli: LayerfsCli, tmp_path: Path) -> None:
    ids = {}
    for name in ("a", "b"):
        tar = tmp_path / f"{name}.tar"
        tar.write_bytes(build_tar(tar_file(name)))
        ids[name] = _image_id(layerfs_cli("import", tar, f"src/{name}").stdout)
    base = [sys.executable, "-m", "layerfs", "--root", str(layerfs_cli.root), "tag"]
    for _ in range(3):
        procs = [
            subprocess.Popen([*base, f"src/{n}", "same/name:1"], stderr=subprocess.PIPE)
            for n in ("a", "b")
        ]
        results = [(p.communicate(timeout=60)[1], p.returncode)[::-1] for p in procs]
        # As docker tag: the name moves; one after the other under the store lock.
        assert results == [(0, b""), (0, b"")], results
        repos = json.loads((layerfs_cli.root / "repositories.json").read_bytes())
        assert repos["Repositories"]["same/name"]["1"] in ids.values()
        assert repos["Repositories"]["src/a"]["latest"] == ids["a"]
        assert repos["Repositories"]["src/b"]["latest"] == ids["b"]
        layerfs_cli("rmi", "same/name:1")
    assert layerfs_cli("fsck").returncode == 0


def test_rmi_during_a_save_waits_for_nothing_and_fails_clearly(
    layerfs_cli: LayerfsCli, tmp_path: Path
) -> None:
    layerfs_cli("import", _big_rootfs(tmp_path / "big.tar", files=300), "saved/img")
    out = tmp_path / "out.tar"
    save = subprocess.Popen(
        [
            *(sys.executable, "-m", "layerfs", "--root", str(layerfs_cli.root)),
            *("save", "-o", out, "saved/img"),
        ],
        stderr=subprocess.PIPE,
    )
    refusals = 0
    removed = False
    while save.poll() is None and not removed:
        result = layerfs_cli("rmi", "saved/img", check=False)
        removed = result.returncode == 0  # the save had not taken its hold yet, or was done
        if not removed:
            assert b"held by an ongoing pull, load or mount" in result.stderr, result.stderr
            refusals += 1
    _, err = save.communicate(timeout=120)
    if save.returncode != 0:  # the rmi came first: a clear error, no output
        assert err.decode().startswith("layerfs: error: No such image: saved/img"), err
        assert not out.exists()
    else:
        with tarfile.open(out) as archive:
            assert "manifest.json" in archive.getnames()
    assert refusals or removed
    assert layerfs_cli("fsck", "--verify").returncode == 0


def test_gc_during_a_load_touches_nothing_of_it(layerfs_cli: LayerfsCli, tmp_path: Path) -> None:
    from tests.archive_builders import docker_members, make_image, make_layer, pack

    layers = [make_layer(f"g{i}", ("data", os.urandom(64 << 10))) for i in range(40)]
    archive = tmp_path / "load.tar"
    archive.write_bytes(pack(docker_members([make_image(layers, ["gc/during:1"])])))
    load = subprocess.Popen(
        [sys.executable, "-m", "layerfs", "--root", str(layerfs_cli.root), "load", "-i", archive],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    runs = 0
    while load.poll() is None or runs == 0:
        assert layerfs_cli("gc").returncode == 0
        runs += 1
    stdout, _ = load.communicate(timeout=120)
    assert load.returncode == 0
    assert stdout.strip().endswith(b"gc/during:1")
    assert len(layerfs_cli("images", "-a", "-q").stdout.split()) == 40
    assert layerfs_cli("fsck", "--verify").returncode == 0
