"""``python -m layerfs`` runs the command line."""

from __future__ import annotations

from layerfs.cli import main

raise SystemExit(main())
