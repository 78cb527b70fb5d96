"""``import`` sources: a URL without a scheme is tried over https, then http, as Docker's
legacy import took it; a platform is recorded in the image config; what is imported is a
valid image; an export of a cut layer tar is a one-line error."""

from __future__ import annotations

import http.server
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerfs.cli import main
from layerfs.errors import IntegrityError, NotFoundError, RegistryError
from layerfs.model.platform import Platform
from layerfs.rootfs import export_image, import_rootfs
from layerfs.store.store import Store
from layerfs.transports.local import StoreSource
from tests.conformance import assert_valid_image
from tests.helpers import build_tar, read_fifo_while, tar_file

TAR = build_tar(tar_file("etc/motd", b"from the web\n"))


@pytest.fixture
def server() -> Iterator[str]:
    """A plain-http server on 127.0.0.1 serving /rootfs.tar; yields "127.0.0.1:PORT"."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/rootfs.tar":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(TAR)))
            self.end_headers()
            self.wfile.write(TAR)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def test_a_url_without_scheme_falls_back_to_http(store: Store, server: str) -> None:
    # The server speaks no TLS: the https attempt fails to connect, http answers.
    result = import_rootfs(store, f"{server}/rootfs.tar", "web/img:1")
    assert result.image.comment == f"Imported from {server}/rootfs.tar"
    with store.layers.open_tar(result.image.layer or "") as layer:
        assert layer.read() == TAR


def test_a_missing_url_says_both_attempts(store: Store, server: str) -> None:
    with pytest.raises(RegistryError, match="it is no file, and as a URL: cannot download http://"):
        import_rootfs(store, f"{server}/nope.tar")


def test_a_local_file_wins_and_a_plain_missing_name_is_no_url(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "example.com").mkdir()
    (tmp_path / "example.com" / "rootfs.tar").write_bytes(TAR)
    assert import_rootfs(store, "example.com/rootfs.tar").image.layer
    with pytest.raises(NotFoundError, match="no such file"):
        import_rootfs(store, "rootfs.tar")


def test_import_platform(store: Store, tmp_path: Path) -> None:
    (tmp_path / "r.tar").write_bytes(TAR)
    image = import_rootfs(
        store, str(tmp_path / "r.tar"), platform=Platform.parse("linux/arm/v7")
    ).image
    doc = json.loads(image.raw_json)
    assert (doc["os"], doc["architecture"], doc["variant"]) == ("linux", "arm", "v7")
    (checked,) = assert_valid_image(StoreSource(store, [image.id]))
    assert checked.config == image.raw_json


def test_export_of_an_image_whose_layer_tar_was_cut_is_a_one_line_error(
    store: Store, tmp_path: Path
):
    data = b"x" * 5000
    (tmp_path / "rootfs.tar").write_bytes(build_tar(tar_file("big", data)))
    image = import_rootfs(store, str(tmp_path / "rootfs.tar"), "cut:1").image
    tar = store.layers.tar_path(image.diff_ids[0])
    os.truncate(tar, 1024)  # the header and the first 512 bytes of the data
    with pytest.raises(IntegrityError, match=r"^cannot export image \w{12}: a layer tar ends"):
        export_image(store, image, io.BytesIO())


def test_export_into_a_device_or_fifo_writes_into_it(store: Store, tmp_path: Path) -> None:
    (tmp_path / "rootfs.tar").write_bytes(TAR)
    import_rootfs(store, str(tmp_path / "rootfs.tar"), "dev/null:1")
    root = ["--root", str(store.root)]
    # A device cannot be fsync'd (EINVAL): -o /dev/null is still a plain success.
    assert main([*root, "export", "-q", "-o", os.devnull, "dev/null:1"]) == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    status, received = read_fifo_while(
        fifo, lambda: main([*root, "export", "-q", "-o", str(fifo), "dev/null:1"])
    )
    expected = io.BytesIO()
    export_image(store, store.tags.lookup_image("dev/null:1"), expected)
    assert status == 0 and received == expected.getvalue()
