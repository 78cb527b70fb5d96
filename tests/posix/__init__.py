"""The differential POSIX test: the same calls on a host directory and on a writable mount.

- ``calls.py``: the call vocabulary and how one call runs on one tree;
- ``snapshot.py``: the complete state of a tree, and what two states may differ in;
- ``runner.py``: runs a sequence on both trees, comparing every answer and state
  (``python -m tests.posix.runner``, standard library only, so that it runs as any
  user from a virtualenv of the system's Python);
- ``generator.py``: the starting tree and seeded random sequences over it;
- ``cases.py``: the hand-written sequences (every case the mount was found wrong in);
- ``session.py``: the host side of a run (starting tree, image, mount, commit, export).

Only ``session.py`` needs layerfs; the runner and what it imports use the standard
library alone.
"""
