"""The everyday commands import only what they need (their start-up is most of their time).

Each command runs in a fresh interpreter that reports the modules it loaded; what must
not be among them is what other commands need: the transports, the registry client and
its HTTP stack, FUSE, decompression, the tar parser, subprocesses. How long start-up
takes is measured by tools/bench/bench_startup.py, never here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs.store.store import Store
from tests.helpers import build_tar, tar_file

NEVER = {
    "requests",
    "urllib3",
    "http.client",
    "ssl",
    "trio",
    "pyfuse3",
    "zstandard",
    "isal",
    "bz2",
    "lzma",
    "gzip",
    "tarfile",
    "shutil",
    "subprocess",
    "concurrent.futures",
    "getpass",
    "platform",
    "uuid",
    "hashlib",
    "layerfs.copy",
    "layerfs.compression",
    "layerfs.transports",
    "layerfs.registry",
    "layerfs.rootfs",
    "layerfs.store.tarindex",
    "layerfs.store.check",
    "logging",
}

# Packages whose __init__ only names things (layerfs.fs names the mount engines for
# the --engine choices): the package may load, none of its modules may.
NEVER_BELOW = {"layerfs.fs"}

# --help lists the commands: it opens no store (nor what a store needs).
HELP_NEVER = {"layerfs.store", "dataclasses", "msgpack", "datetime"}

REPORT = """
import json, sys
from layerfs.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "modules": sorted(sys.modules)}, out)
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = Store.open(tmp_path_factory.mktemp("startup") / "store")
    layer = store.layers.ingest(io.BytesIO(build_tar(tar_file("etc/motd", b"hello\n"))))
    image = store.graph.create(layer, created_by="test")
    store.tags.tag("app", "1", image.id)
    return store.root


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["images"],
        ["images", "-a"],
        ["inspect", "app:1"],
        ["history", "app:1"],
        ["tag", "app:1", "app:2"],
    ],
    ids=" ".join,
)
def test_a_command_loads_none_of_the_others_modules(
    store: Path, tmp_path: Path, args: list[str]
) -> None:
    report = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", REPORT, str(report), "--root", str(store), *args],
        check=True,
        capture_output=True,
    )
    result = json.loads(report.read_text())
    assert result["code"] == 0
    never = NEVER | HELP_NEVER if args == ["--help"] else NEVER
    loaded = {
        m
        for m in result["modules"]
        if any(m == n or m.startswith(n + ".") for n in never)
        or any(m.startswith(n + ".") for n in NEVER_BELOW)
    }
    assert loaded == set()


def test_logging_is_configured_when_first_imported() -> None:
    """The commands configure logging without importing it; a later import gets the format."""
    code = (
        "import sys\n"
        "from layerfs.cli import configure_logging\n"
        "configure_logging(False)\n"
        "assert 'logging' not in sys.modules\n"
        "import logging\n"
        "logging.getLogger('layerfs.x').warning('disk %s is full', 'd')\n"
        "logging.getLogger('layerfs.x').info('not shown')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "layerfs: WARNING: disk d is full\n"
