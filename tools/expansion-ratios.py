#!/usr/bin/env python3
"""Measure how far real layers expand when decompressed, as layerfs's bomb cap sees it.

    .venv/bin/python tools/expansion-ratios.py LAYER.tar [LAYER.tar ...]

Each uncompressed layer tar is compressed in memory with gzip (level 6, what
``docker push`` and ``gzip`` use by default) and zstd (level 3, the zstd
default), then streamed back through layerfs's own decompressing reader. The
cap (``layerfs/compression.py``) compares the bytes produced with the
compressed bytes consumed so far, once past its grace; so this prints, per
file and compression, the overall ratio and the highest running ratio seen
after 1, 16 and 64 MiB of output. docs/store-format.md records the results
that chose the default cap.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerfs.compression import PeekableReader

GRACES = (1 << 20, 16 << 20, 64 << 20)


def running_ratios(blob: bytes, kind: str) -> tuple[float, list[float]]:
    source = PeekableReader(io.BytesIO(blob))
    reader: io.RawIOBase | zstandard.ZstdDecompressionReader
    if kind == "gzip":
        reader = gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[assignment]
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
    produced = 0
    peaks = [0.0 for _ in GRACES]
    while data := reader.read(1 << 20):
        produced += len(data)
        ratio = produced / max(source.consumed, 1)
        for i, grace in enumerate(GRACES):
            if produced > grace:
                peaks[i] = max(peaks[i], ratio)
    return produced / len(blob), peaks


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    print("| layer | size | compression | ratio | peak after 1 MiB | 16 MiB | 64 MiB |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        raw = Path(path).read_bytes()
        blobs = {
            "gzip -6": ("gzip", gzip.compress(raw, compresslevel=6, mtime=0)),
            "zstd -3": ("zstd", zstandard.ZstdCompressor(level=3).compress(raw)),
        }
        for label, (kind, blob) in blobs.items():
            ratio, peaks = running_ratios(blob, kind)
            shown = " | ".join(f"{p:.1f}x" if p else "-" for p in peaks)
            name = os.path.basename(path)
            print(f"| {name} | {len(raw) / 1e6:.0f} MB | {label} | {ratio:.1f}x | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
