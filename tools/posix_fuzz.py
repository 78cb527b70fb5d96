#!/usr/bin/env python3
"""Run many seeded random call sequences on a writable mount and on the host, as CI cannot.

    sudo .venv/bin/python tools/posix_fuzz.py --seeds 1-200 --steps 300 --as both

Each seed is one sequence (tests/posix/generator.py) run on a fresh host directory and a
fresh writable mount of the same tree, compared after every call, then committed,
exported and compared with the host tree (tests/posix/session.py), as root, as a normal
user, or both. A seed that differs is printed with the calls before the difference and
what differed; ``--shrink`` then cuts the sequence down to the shortest prefix that
still differs and drops every call that the difference does not need, and prints that
as JSON for a hand-written case (tests/posix/cases.py). Exit status 1 if any seed
differed. Needs root (it builds root-owned trees and bind mounts), FUSE and
/usr/bin/python3 for the normal user's run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.conftest import kill_processes_naming, unmount_all_under  # noqa: E402
from tests.posix.calls import Call  # noqa: E402
from tests.posix.generator import sequence  # noqa: E402
from tests.posix.session import ENGINES, Outcome, Session  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    """``1-50``, ``7``, ``1,5,9-12``."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        seeds += list(range(int(first), int(last) + 1)) if dash else [int(first)]
    return seeds


def shrink(session: Session, calls: list[Call]) -> list[Call]:
    """A shorter sequence that still differs: the shortest failing prefix, then chunks of
    calls removed while it keeps failing, halving the chunks down to single calls."""

    def fails(candidate: list[Call]) -> bool:
        return not session.run("shrinking", candidate).ok

    low, high = 0, len(calls)  # calls[:high] fails
    while high - low > 1:
        middle = (low + high) // 2
        if fails(calls[:middle]):
            high = middle
        else:
            low = middle
    kept = calls[:high]
    chunk = max(1, len(kept) // 2)
    while True:
        start = len(kept) - 1 - chunk  # the last call, which differs, stays
        while start >= 0:
            candidate = kept[:start] + kept[start + chunk :]
            if fails(candidate):
                kept = candidate
            start -= chunk
        if chunk == 1:
            return kept
        chunk //= 2


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="1-20", help="seeds: 1-50, 7 or 1,5,9-12")
    parser.add_argument("--steps", type=int, default=300, help="calls per sequence")
    parser.add_argument("--as", dest="who", choices=["root", "user", "both"], default="both")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="pyfuse3")
    parser.add_argument("--shrink", action="store_true", help="shrink what differs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it builds root-owned trees, device nodes and bind mounts")

    seeds = parse_seeds(args.seeds)
    users = {"root": [False], "user": [True], "both": [False, True]}[args.who]
    work = Path(tempfile.mkdtemp(prefix="layerfs-posix-fuzz-", dir="/tmp"))
    work.chmod(0o755)  # the normal user's run must reach the trees
    failed: list[str] = []
    answers: Counter[str] = Counter()
    started = time.monotonic()
    steps = 0
    try:
        for user in users:
            who = "user" if user else "root"
            session = Session(work / who, ENGINES[args.engine], user=user)
            for seed in seeds:
                calls = sequence(seed, args.steps, user=user)
                outcome: Outcome = session.run(f"seed {seed} as {who}", calls)
                steps += outcome.report.get("steps", 0)
                for counts in outcome.report.get("answers", {}).values():
                    answers.update(counts)
                if outcome.ok:
                    print(f"seed {seed} as {who}: {len(calls)} calls, no difference", flush=True)
                    continue
                failed.append(f"{seed} as {who}")
                print(outcome.explain(), flush=True)
                if args.shrink:
                    small = shrink(session, calls)
                    print(f"seed {seed} as {who}, shrunk to {len(small)} calls:")
                    print(json.dumps(small))
    finally:
        unmount_all_under(work)
        kill_processes_naming(work)
        unmount_all_under(work)
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    ok = answers.pop("ok", 0)
    print(
        f"{len(seeds) * len(users)} sequences, {steps} calls ({ok} succeeded, "
        f"{sum(answers.values())} refused: {dict(answers.most_common(6))}) in {elapsed:.0f} s; "
        f"{len(failed)} differed{': ' + ', '.join(failed) if failed else ''}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
