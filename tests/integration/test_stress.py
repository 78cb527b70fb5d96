"""The short run of tools/stress.py: several processes at once, every command, then checks.

The long run (30 minutes, 4 workers) is in docs/benchmarks.md; this one keeps CI short.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import LayerfsCli

pytestmark = [pytest.mark.integration, pytest.mark.fuse]
STRESS = Path(__file__).resolve().parents[2] / "tools" / "stress.py"


def test_a_short_stress_run_leaves_a_clean_store(layerfs_cli: LayerfsCli, tmp_path: Path) -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    work = tmp_path / "stress"
    layerfs_cli.root = work / "store"  # the fixture's cleanup covers the store's mounts
    result = subprocess.run(
        [sys.executable, STRESS, "--workers", "3", "--seconds", "40", "--work", work],
        capture_output=True,
        timeout=600,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "FAILURE" not in out and "PROBLEM" not in out
    done = int(re.search(r", (\d+) operations,", out).group(1))  # type: ignore[union-attr]
    assert done >= 10, out
    assert "store checks: fsck --verify clean" in out
