"""Ingest workers: big compressed layers of a copy are ingested by forked processes.

Workers are forked only from a single-threaded process, which a test process running
pytest (and its xdist thread) is not: each test runs its copy in a fresh interpreter
(``SCRIPT``) and looks at what it reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from layerfs.store.check import fsck
from layerfs.store.store import Store

SCRIPT = r"""
import gzip, hashlib, io, json, os, sys, tarfile
from pathlib import Path
import layerfs.store.workers as workers
from layerfs.copy import copy
from layerfs.store.store import Store
from layerfs.model.manifest import MEDIA_DOCKER_LAYER_GZIP
from layerfs.transports.base import ImageSource, LayerDesc, SourceImage
from layerfs.transports.local import StoreDestination

root, report, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
ingest = workers._ingest
def recording(*args):
    with open(report.with_suffix(".pids"), "a") as out:
        out.write(f"{os.getpid()}\n")
    if mode == "die":
        os._exit(9)
    return ingest(*args)
workers._ingest = recording

def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()

tars = []
for i in range(2):
    data = os.urandom(workers.MIN_SIZE + 100_000)  # stays that big when gzipped
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(f"blob{i}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tars.append(out.getvalue())
blobs = [gzip.compress(t, compresslevel=1, mtime=0) for t in tars]
if mode == "corrupt":
    blobs[1] = blobs[1][:-5000] + bytes(5000)
config = json.dumps({"architecture": "amd64", "os": "linux",
                     "rootfs": {"type": "layers", "diff_ids": [digest(t) for t in tars]}}).encode()
layers = [LayerDesc(digest(t), digest(b), len(b), MEDIA_DOCKER_LAYER_GZIP)
          for t, b in zip(tars, blobs)]
image = SourceImage(config=config, layers=layers, references=["big:1"], name="big:1")

class Source(ImageSource):
    def images(self): return [image]
    def open_layer(self, image, index): return io.BytesIO(blobs[index])
    def close(self): pass

result = {"pid": os.getpid()}
try:
    copy(Source(), StoreDestination(Store.open(root)), max_concurrent=2, keep_going=False)
except Exception as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
report.write_text(json.dumps(result))
"""


def run(tmp_path: Path, mode: str) -> tuple[dict[str, object], list[int]]:
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "store"), str(report), mode],
        check=True,
        timeout=120,
    )
    pids_file = report.with_suffix(".pids")
    pids = [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []
    return json.loads(report.read_text()), pids


def test_two_big_layers_are_ingested_by_two_workers(tmp_path: Path) -> None:
    result, pids = run(tmp_path, "ok")
    assert "error" not in result
    assert len(pids) == 2 and result["pid"] not in pids  # in other processes
    store = Store.open(tmp_path / "store")
    assert store.tags.lookup_image("big:1").id
    assert fsck(store, verify=True).clean
    assert list(store.tmp.iterdir()) == []


def test_a_corrupt_layer_fails_in_its_worker_and_leaves_nothing(tmp_path: Path) -> None:
    result, pids = run(tmp_path, "corrupt")
    assert len(pids) == 2
    assert str(result["error"]).startswith(("FormatError", "DigestMismatchError"))
    store = Store.open(tmp_path / "store")
    assert list(store.tmp.iterdir()) == [] and store.graph.ids() == []
    assert store.layers.diff_ids() == []


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path: Path) -> None:
    result, _ = run(tmp_path, "die")
    assert "the ingest worker process died" in str(result["error"])
    store = Store.open(tmp_path / "store")
    assert list(store.tmp.iterdir()) == [] and store.graph.ids() == []
