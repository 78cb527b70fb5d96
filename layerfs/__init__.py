"""layerfs: a Docker-style image store whose images mount as union FUSE filesystems."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
