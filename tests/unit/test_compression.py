"""Tests for layerfs.compression: detection, multi-member streams, errors, the expansion cap."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import zlib
from collections.abc import Callable

import pytest
import zstandard

from layerfs import compression
from layerfs.compression import detect, open_decompressed
from layerfs.errors import ExpansionLimitError, FormatError
from tests.helpers import build_tar, tar_dir, tar_file

PAYLOAD = b"".join(b"line %d of a layer that compresses well\n" % i for i in range(5000))


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _gzip,
    "zstd": _zstd,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
}


def decompress_all(blob: bytes, *, chunk: int | None = None) -> tuple[bytes, str]:
    reader, kind = open_decompressed(io.BytesIO(blob), "test layer")
    if chunk is None:
        return reader.read(), kind
    parts = []
    while data := reader.read(chunk):
        assert len(data) <= chunk
        parts.append(data)
    return b"".join(parts), kind


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERFS_MAX_EXPANSION_RATIO", raising=False)
    monkeypatch.delenv("LAYERFS_EXPANSION_FREE_BYTES", raising=False)


# -- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_detect_each_format(kind: str) -> None:
    assert detect(COMPRESSORS[kind](b"x")[:6]) == kind


@pytest.mark.parametrize(
    "head", [b"", b"\x1f", b"ustar\0", b"BZ", b"\xfd7zXZ", b"(\xb5/", bytes(6), b"PK\x03\x04"]
)
def test_detect_everything_else_as_none(head: bytes) -> None:
    assert detect(head) == "none"


def test_a_plain_tar_is_not_detected_as_compressed() -> None:
    data = build_tar(tar_dir("bin"), tar_file("bin/x", b"\x1f\x8b not gzip"))
    assert detect(data[:6]) == "none"


# -- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_each_format_decodes(kind: str) -> None:
    assert decompress_all(COMPRESSORS[kind](PAYLOAD)) == (PAYLOAD, kind)


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("chunk", [1, 511, 4096, 1 << 20])
def test_each_format_decodes_in_bounded_reads(kind: str, chunk: int) -> None:
    payload = PAYLOAD[:20000] if chunk == 1 else PAYLOAD
    assert decompress_all(COMPRESSORS[kind](payload), chunk=chunk) == (payload, kind)


def test_plain_input_passes_through_unchanged() -> None:
    data = build_tar(tar_file("f", b"hello"))
    assert decompress_all(data) == (data, "none")
    assert decompress_all(data, chunk=100) == (data, "none")


def test_plain_input_shorter_than_the_magic_passes_through() -> None:
    assert decompress_all(b"abc") == (b"abc", "none")
    assert decompress_all(b"") == (b"", "none")


def test_plain_reader_counts_what_it_returns() -> None:
    reader, _ = open_decompressed(io.BytesIO(b"0123456789"), "x")
    assert reader.read(3) == b"012"
    assert reader.read() == b"3456789"
    assert reader.consumed == 10


def test_empty_compressed_payloads() -> None:
    for kind, compress in COMPRESSORS.items():
        assert decompress_all(compress(b"")) == (b"", kind)


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz", "zstd"])
def test_multi_member_streams_decode_whole(kind: str) -> None:
    compress = COMPRESSORS[kind]
    parts = [b"first member\n" * 100, b"", b"second member\n" * 3000, b"third"]
    blob = b"".join(compress(p) for p in parts)
    assert decompress_all(blob) == (b"".join(parts), kind)
    assert decompress_all(blob, chunk=1000)[0] == b"".join(parts)


def test_multi_member_gzip_like_pigz_writes_it() -> None:
    # pigz and "cat a.gz b.gz" produce members back to back; Docker's reader takes them all.
    layer = build_tar(tar_dir("a"), tar_file("a/f", PAYLOAD))
    half = len(layer) // 2
    blob = _gzip(layer[:half]) + _gzip(layer[half:])
    assert decompress_all(blob) == (layer, "gzip")


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_member_boundaries_on_the_source_read_boundary(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    compress = COMPRESSORS[kind]
    first, second = compress(b"A" * 100), compress(b"B" * 100)

    class ExactReads(io.BytesIO):
        """Hands out the first member alone, then the rest."""

        def read(self, size: int | None = -1) -> bytes:
            limit = len(first) - self.tell() if self.tell() < len(first) else size
            return super().read(min(size, limit) if size and size > 0 else limit)

    reader, _ = open_decompressed(ExactReads(first + second), "x")
    assert reader.read() == b"A" * 100 + b"B" * 100


# -- broken input -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_streams_are_format_errors(kind: str, keep: float) -> None:
    blob = COMPRESSORS[kind](PAYLOAD)
    with pytest.raises(FormatError, match=f"test layer: (truncated|corrupt) {kind}"):
        decompress_all(blob[: int(len(blob) * keep)])


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_stream_cut_right_after_the_magic_is_a_format_error(kind: str) -> None:
    blob = COMPRESSORS[kind](PAYLOAD)
    with pytest.raises(FormatError, match=kind):
        decompress_all(blob[:6])


def test_truncated_gzip_says_truncated() -> None:
    blob = _gzip(PAYLOAD)
    with pytest.raises(FormatError, match="test layer: truncated gzip stream"):
        decompress_all(blob[:-4])  # the ISIZE trailer is missing


def test_truncated_zstd_says_truncated() -> None:
    blob = _zstd(PAYLOAD)
    with pytest.raises(FormatError, match="test layer: truncated zstd stream"):
        decompress_all(blob[:-3])


def test_truncated_second_zstd_frame_is_a_format_error() -> None:
    second = _zstd(b"second frame " * 100)
    with pytest.raises(FormatError, match="truncated zstd stream"):
        decompress_all(_zstd(PAYLOAD) + second[: len(second) // 2])


def test_zstd_with_a_content_checksum_and_skippable_frames() -> None:
    checked = zstandard.ZstdCompressor(write_checksum=True).compress(PAYLOAD)
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    assert decompress_all(checked + skippable + _zstd(b"tail"))[0] == PAYLOAD + b"tail"
    with pytest.raises(FormatError, match="truncated zstd stream"):
        decompress_all(checked[:-2])  # only the checksum is cut


def test_corrupt_gzip_data_is_a_format_error() -> None:
    blob = bytearray(_gzip(PAYLOAD))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(FormatError, match="test layer: corrupt gzip data"):
        decompress_all(bytes(blob))


def test_gzip_with_a_wrong_crc_is_a_format_error() -> None:
    blob = bytearray(_gzip(PAYLOAD))
    blob[-8] ^= 0x01  # the CRC32 in the trailer
    with pytest.raises(FormatError, match="corrupt gzip data"):
        decompress_all(bytes(blob))


def test_corrupt_zstd_data_is_a_format_error() -> None:
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(PAYLOAD))
    for i in range(20, len(blob) - 8, 7):
        blob[i] ^= 0x5A
    with pytest.raises(FormatError, match="test layer: corrupt zstd data"):
        decompress_all(bytes(blob))


@pytest.mark.parametrize("kind", ["bzip2", "xz"])
def test_corrupt_bzip2_and_xz_are_format_errors(kind: str) -> None:
    blob = bytearray(COMPRESSORS[kind](PAYLOAD))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(FormatError, match=f"corrupt {kind} data"):
        decompress_all(bytes(blob))


def test_garbage_after_a_gzip_member_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="gzip"):
        decompress_all(_gzip(PAYLOAD) + b"garbage that is not a gzip member")


def test_zlib_stream_without_gzip_framing_is_not_taken_for_gzip() -> None:
    blob = zlib.compress(PAYLOAD)
    assert decompress_all(blob) == (blob, "none")


# -- the expansion cap ------------------------------------------------------------------------


def test_expansion_cap_stops_a_gzip_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "FREE_OUTPUT", 64 * 1024)
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", "10")
    bomb = _gzip(bytes(8 << 20))  # 8 MiB of zeros in ~8 KiB
    reader, _ = open_decompressed(io.BytesIO(bomb), "bomb.tar.gz")
    with pytest.raises(ExpansionLimitError, match=r"bomb.tar.gz: .* past 10x") as info:
        while reader.read(1 << 16):
            pass
    assert "LAYERFS_MAX_EXPANSION_RATIO" in str(info.value)
    assert reader.produced < 2 << 20  # stopped early, not after writing it all


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_expansion_cap_applies_to_every_format(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "FREE_OUTPUT", 1024)
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", "5")
    with pytest.raises(ExpansionLimitError):
        decompress_all(COMPRESSORS[kind](bytes(4 << 20)))


def test_expansion_cap_is_an_error_of_the_format_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "FREE_OUTPUT", 0)
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", "2")
    with pytest.raises(FormatError):
        decompress_all(_zstd(bytes(1 << 20)))


def test_free_output_allows_small_bombs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", "2")
    monkeypatch.setenv("LAYERFS_EXPANSION_FREE_BYTES", str(8 << 20))
    assert decompress_all(_gzip(bytes(4 << 20)))[0] == bytes(4 << 20)


def test_expansion_cap_does_not_trigger_on_a_normal_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "FREE_OUTPUT", 1024)  # the default ratio applies at once
    rng = random.Random(7)
    layer = build_tar(
        tar_dir("usr"),
        tar_file("usr/random.bin", rng.randbytes(1 << 20)),
        tar_file("usr/text", PAYLOAD),
        tar_file("usr/zeros", bytes(256 * 1024)),
    )
    for kind, compress in COMPRESSORS.items():
        assert decompress_all(compress(layer), chunk=65536) == (layer, kind)


def test_a_higher_ratio_lets_a_bomb_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "FREE_OUTPUT", 1024)
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", "5")
    bomb = _gzip(bytes(2 << 20))
    with pytest.raises(ExpansionLimitError):
        decompress_all(bomb)
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", "100000")
    assert decompress_all(bomb)[0] == bytes(2 << 20)


@pytest.mark.parametrize("value", ["", "lots", "1.5"])
def test_an_unparsable_ratio_falls_back_to_the_default(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compression, "FREE_OUTPUT", 1024)
    monkeypatch.setenv("LAYERFS_MAX_EXPANSION_RATIO", value)
    # text expands ~10x: under the default ratio of 100, so it passes
    text = b"".join(b"line %d of a log file\n" % i for i in range(100_000))
    assert decompress_all(_gzip(text))[0] == text
    # gzip squeezes zeros ~1000x, zstd far beyond: the default cap stops both
    for compress in (_gzip, _zstd):
        with pytest.raises(ExpansionLimitError, match=f"past {compression.DEFAULT_MAX_RATIO}x"):
            decompress_all(compress(bytes(8 << 20)))


@pytest.mark.parametrize("level", [1, 19])
def test_streamed_zstd_frames_without_a_content_size(level: int) -> None:
    # What zstd writes when it does not know the size up front: a windowed frame of
    # many blocks with no Frame_Content_Size field.
    payload = b"".join(random.Random(level).randbytes(64) + bytes(3000) for _ in range(400))
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=False)
    blob = b"".join(compressor.read_to_iter(io.BytesIO(payload)))
    assert zstandard.get_frame_parameters(blob).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert decompress_all(blob, chunk=65536) == (payload, "zstd")
    for cut in (len(blob) // 3, len(blob) - 1):
        with pytest.raises(FormatError, match="truncated zstd stream"):
            decompress_all(blob[:cut])


# --- ReadAheadReader ------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 20, 3 << 20])
def test_read_ahead_returns_the_source_bytes_in_order(size: int) -> None:
    data = random.Random(size).randbytes((5 << 20) if size > 4096 else (1 << 20) + 3)
    reader = compression.ReadAheadReader(io.BytesIO(data), chunk=1 << 20, depth=2)
    try:
        parts = []
        while True:
            part = reader.read(size)
            assert len(part) <= size
            if not part:
                break
            parts.append(part)
        assert b"".join(parts) == data
        assert reader.read(10) == b""  # and stays at the end
    finally:
        reader.close()


def test_read_ahead_read_all() -> None:
    data = random.Random(1).randbytes(3 << 20 | 5)
    reader = compression.ReadAheadReader(io.BytesIO(data), chunk=1 << 20)
    try:
        assert reader.read(3) == data[:3]
        assert reader.read() == data[3:]
    finally:
        reader.close()


def test_read_ahead_raises_the_source_error_after_the_good_bytes() -> None:
    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def read(self, n: int) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise FormatError("corrupt gzip stream")
            return b"x" * n

    reader = compression.ReadAheadReader(Failing(), chunk=10)
    try:
        assert reader.read(100) == b"x" * 10
        assert reader.read(100) == b"x" * 10
        with pytest.raises(FormatError, match="corrupt gzip stream"):
            reader.read(100)
        assert reader.read(100) == b""
    finally:
        reader.close()


def test_read_ahead_close_stops_a_worker_that_waits_on_a_full_queue() -> None:
    class Endless:
        def read(self, n: int) -> bytes:
            return b"y" * n

    reader = compression.ReadAheadReader(Endless(), chunk=16, depth=2)
    assert reader.read(16) == b"y" * 16
    reader.close()
    assert not reader._thread.is_alive()


def test_ingest_of_a_compressed_layer_goes_through_read_ahead(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layerfs.store import layers

    made: list[compression.ReadAheadReader] = []

    class Recording(compression.ReadAheadReader):
        def __init__(self, source: object) -> None:
            super().__init__(source)
            made.append(self)

    monkeypatch.setattr(compression, "ReadAheadReader", Recording)  # imported by ingest
    (tmp_path / "tmp").mkdir()
    store = layers.LayerStore(tmp_path / "layers", tmp_path / "tmp")
    tar = build_tar(tar_dir("etc"), tar_file("etc/hostname", b"box\n"))
    plain = store.ingest(io.BytesIO(tar))
    assert not made
    packed = store.ingest(io.BytesIO(gzip.compress(tar)))
    assert len(made) == 1 and not made[0]._thread.is_alive()
    assert packed.diff_id == plain.diff_id
    assert (packed.staging / "layer.tar").read_bytes() == tar
