"""Tests for tests/guide.py: how the guide's runnable transcripts are read and compared."""

from __future__ import annotations

import pytest

from tests.guide import parse, rewritten, same_shape, shape
from tests.helpers import REPO_ROOT

TEXT = """intro
<!-- runnable: script -->
```
mkdir x
```
text
<!-- runnable -->
```
$ layerfs images
REPOSITORY   TAG   IMAGE ID       CREATED         SIZE
ex/app       1     96e5a0136e0e   2 seconds ago   1.98MB
$ unshare --mount sh -c \\
    'echo hi'
hi
$ python3 - <<'EOF'
print("$ not a command")
EOF
done
```
```
$ not marked
```
"""


def test_blocks_steps_continuations_and_heredocs() -> None:
    script, transcript = parse(TEXT)
    assert script.script and script.body == ["mkdir x"]
    assert [s.command for s in transcript.steps] == [
        "layerfs images",
        "unshare --mount sh -c \\\n    'echo hi'",
        "python3 - <<'EOF'\nprint(\"$ not a command\")\nEOF",
    ]
    assert transcript.steps[0].expected[1].startswith("ex/app")
    assert transcript.steps[2].expected == ["done"]


def test_a_marker_must_precede_a_fence() -> None:
    with pytest.raises(ValueError, match="must precede a fenced block"):
        parse("<!-- runnable -->\ntext\n")


def test_shapes_ignore_ids_times_sizes_and_alignment() -> None:
    guide = ["IMAGE ID       CREATED         SIZE", "96e5a0136e0e   2 seconds ago   1.98MB"]
    run = ["IMAGE ID   CREATED   SIZE", "0ef671faf333  About a minute ago  12.3kB"]
    assert same_shape(guide, run)
    assert not same_shape(guide, ["IMAGE ID   CREATED   SIZE"])
    assert not same_shape(["Untagged: a:1"], ["layerfs: error: No such image: a:1"])


def test_the_pid_column_of_mounts_is_a_value_of_any_width() -> None:
    guide = ["/tmp/guide/mnt   ex/web   b6f233780cc6   ro   native    12987     running"]
    assert same_shape(
        guide, ["/tmp/guide/mnt   ex/web   0414b9a48c80   ro   native   48   running"]
    )
    assert same_shape(guide, ["/tmp/guide/mnt   ex/web   0414b9a48c80   ro   native   7   running"])
    assert not same_shape(
        guide, ["/tmp/guide/mnt   ex/web   0414b9a48c80   ro   native   7   dead"]
    )
    assert shape(["pid 1", "3 running"]) == ["pid 1", "<pid> running"]


def test_progress_runs_in_any_order_and_ellipsis() -> None:
    guide = ["e7c5bd4cdc05: Waiting", "8a69b08d69d0: Pushed", "...", "end"]
    run = ["aaaaaaaaaaaa: Pushed", "bbbbbbbbbbbb: Waiting", "x", "y", "end"]
    assert same_shape(guide, run)
    assert shape(["2026-11-26T15:13:29.246652000Z", "Nov 14  2023", "pid 1625"]) == [
        "<time>",
        "<date>",
        "pid <n>",
    ]


def test_rewriting_keeps_the_ellipsis() -> None:
    guide = ["[", '    "Id": "sha256:' + "a" * 64 + '",', "...", "]"]
    run = ["[", '    "Id": "sha256:' + "b" * 64 + '",', '    "More": 1,', "]", ""]
    assert rewritten(guide, run) == ["[", '    "Id": "sha256:' + "b" * 64 + '",', "...", "]"]
    assert rewritten(["other"], run) == run[:-1]


def test_the_guide_has_runnable_transcripts() -> None:
    blocks = parse((REPO_ROOT / "docs" / "guide.md").read_text())
    assert len(blocks) >= 15 and blocks[0].script
