"""A writable mount against the host's file system: the same calls, the same answers and states.

Every sequence runs on a fresh host directory and on a fresh writable mount of an image
of the same tree; after each call the answers and the complete states must agree, and
at the end the committed and exported mount must equal the host directory
(``tests/posix``). The hand-written sequences hold every case the mount was once found
wrong in; the seeded random ones find new ones (``tools/posix_fuzz.py`` runs many more).
Each runs as root and as a normal user (the mount served by root with ``allow_other``,
the calls made through ``setpriv`` from a virtualenv of the system's Python).

The mount is parametrized by engine: a new engine is one line in
``tests.posix.session.ENGINES``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import kill_processes_naming, unmount_all_under
from tests.posix.calls import Call
from tests.posix.cases import CASES, documented
from tests.posix.generator import sequence
from tests.posix.session import ENGINES, SYSTEM_PYTHON, Outcome, Session

pytestmark = [pytest.mark.fuse, pytest.mark.integration]

SEEDS = (1, 2, 3)
STEPS = 120
GROUPS = [*CASES, "documented"]


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module", params=["root", "user"])
def session(request: pytest.FixtureRequest, engine: str, fuse_available: None) -> Iterator[Session]:
    """A store with the starting image, shared by a module's sequences of one engine and user.

    Its work directory is made outside pytest's (which only root may enter) so that the
    normal user of the unprivileged run reaches the trees.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: builds root-owned trees and device nodes, bind-mounts them")
    user = request.param == "user"
    if user and not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing (apt-get install python3-venv)")
    work = Path(tempfile.mkdtemp(prefix="layerfs-posix-", dir="/tmp"))
    try:
        yield Session(work, ENGINES[engine], user=user)
    finally:
        unmount_all_under(work)
        kill_processes_naming(work)
        unmount_all_under(work)
        shutil.rmtree(work)


def _check(outcome: Outcome, calls: list[Call], *, least_ok: float) -> None:
    assert outcome.ok, outcome.explain()
    report = outcome.report
    assert report["steps"] == len(calls)
    # A sequence whose calls all fail would compare little: require real work.
    succeeded = sum(answers.get("ok", 0) for answers in report["answers"].values())
    assert succeeded >= least_ok * len(calls), report["answers"]


@pytest.mark.parametrize("group", GROUPS)
def test_hand_written_sequences(session: Session, group: str) -> None:
    if group == "documented":  # documented refusals: every answer an errno
        calls = documented()
        _check(session.run(group, calls), calls, least_ok=0)
    else:
        calls = CASES[group]
        _check(session.run(group, calls), calls, least_ok=0.3)


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_random_sequences(session: Session, seed: int) -> None:
    calls = sequence(seed, STEPS, user=session.user)
    # Random calls are refused often (a normal user's most of all): the bound only
    # catches a sequence that does nothing at all.
    _check(session.run(f"seed {seed}", calls), calls, least_ok=0.1)
