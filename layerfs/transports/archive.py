"""docker-archive: the tarballs of ``docker save`` / ``docker load`` (FORMATS §5).

Reading (:class:`DockerArchiveSource`) accepts every layout Docker has written:

* modern archives, ``manifest.json`` + config + layers: Docker 1.10-24
  (``<configHex>.json``, ``<v1id>/layer.tar``, repeated layers as symlinks) and Docker 25+
  (``blobs/sha256/<hex>`` beside an OCI ``index.json``), also containerd's exports whose
  layer blobs are compressed;
* legacy archives (Docker <= 1.9): ``repositories`` + ``<id>/json`` + ``<id>/layer.tar``,
  loaded as v1 chains that keep their IDs (``SourceImage.legacy``). Docker 1.8/1.9 wrote
  digest keys (``"sha256:..."``) beside tags in ``repositories``; they become
  ``repo@digest`` names (recorded with ``set_digest``, as 1.8 did).

``Parent`` of a manifest.json entry names the config of another image of the archive that
this one was built on; it is kept (``SourceImage.parent``) only when that image is in the
archive, as Docker's loader keeps it, and the images are ordered parents first so that the
store can build the child on its parent (no extra node).

Every document is checked before ``images()`` returns (see ``documents.py``); an image
whose documents are broken is left out and listed in ``rejected`` while the others load.
Layers are read in place, never extracted (``files.py``).

Writing (:class:`DockerArchiveDestination`) produces what Docker 1.10-24 writes by default,
so old and new tools load it: per layer a ``<v1id>/`` directory with ``VERSION``, ``json``
and ``layer.tar`` (v1 IDs and JSON byte-exact as Docker derives them, ``v1compat.py``),
``<configHex>.json``, ``manifest.json`` and ``repositories``. A layer already written is
written once; later directories get a ``layer.tar`` symlink to it, as Docker does. Times
are the image's ``created`` (``manifest.json`` and ``repositories``: the epoch), owners
0:0; members go out in copy order (per image: its new layers base first, then its other
layer directories and its config; ``manifest.json`` and ``repositories`` last). Saving
the same images twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, BinaryIO

from layerfs.compression import open_decompressed
from layerfs.errors import DepthLimitError, FormatError, LayerfsError
from layerfs.model.config import config_diff_ids, config_from_chain
from layerfs.model.digest import sha256_digest
from layerfs.model.documents import expect_list, expect_object, expect_str
from layerfs.model.image import MAX_IMAGE_DEPTH, Image, decode_json
from layerfs.model.manifest import blob_layer_type
from layerfs.model.reference import Reference, full_name
from layerfs.model.v1compat import go_quote, v1_layers
from layerfs.transports.base import ImageSource, LayerDesc, LegacyNode, SourceImage
from layerfs.transports.files import ArchiveFiles
from layerfs.transports.writer import (
    ImagePlan,
    LayoutDestination,
    LayoutWriter,
    WrittenLayer,
)

log = logging.getLogger(__name__)

_HEX_JSON = re.compile(r"^(?:.*/)?([a-f0-9]{64})\.json\Z")
_BLOB = re.compile(r"^blobs/sha256/([a-f0-9]{64})\Z")
_LEGACY_JSON = re.compile(r"^([^/]+)/json\Z")
_ID = re.compile(r"^[a-f0-9]{64}\Z")
_CHUNK = 1 << 20


# -- reading -------------------------------------------------------------------------------


class DockerArchiveSource(ImageSource):
    """Images of a docker-archive (modern or legacy), read in place."""

    def __init__(self, files: ArchiveFiles, *, reference: str | None = None) -> None:
        self.files = files
        self.description = files.description
        self.reference = Reference.parse(reference) if reference else None
        self.rejected: list[tuple[str, LayerfsError]] = []
        self._images: list[SourceImage] | None = None

    def images(self) -> list[SourceImage]:
        if self._images is None:
            if self.files.exists("manifest.json"):
                images = self._modern()
            elif self.files.exists("repositories") or self._legacy_dirs():
                images = self._legacy()
            else:
                raise FormatError(
                    "not a docker-archive: it has no manifest.json and no repositories file"
                )
            if self.reference is not None:
                wanted = str(self.reference)
                images = [i for i in images if wanted in i.references]
                if not images:
                    raise FormatError(f"the archive has no image named {wanted}")
                for image in images:
                    image.references = [wanted]
            self._images = images
        return self._images

    def open_layer(self, image: SourceImage, index: int) -> BinaryIO:
        path = image.extra["layer_paths"][index]
        return self.files.open(path, f"{image.name}: layer {index + 1}")

    def close(self) -> None:
        self.files.close()

    def _reject(self, name: str, exc: LayerfsError) -> None:
        log.debug("rejecting %s", name, exc_info=exc)
        self.rejected.append((name, exc))

    # -- modern --------------------------------------------------------------------------

    def _modern(self) -> list[SourceImage]:
        doc = decode_json(self.files.read("manifest.json", "manifest.json"), "manifest.json")
        if doc is None:
            raise FormatError("manifest.json is null")
        entries = expect_list(doc, "manifest.json")
        images = []
        for number, entry in enumerate(entries, 1):
            name = _entry_name(entry, number)
            try:
                images.append(self._modern_image(entry, name))
            except LayerfsError as exc:
                self._reject(name, exc)
        return _parents_first(images)

    def _modern_image(self, entry: Any, name: str) -> SourceImage:
        where = f"{name}: manifest.json"
        item = expect_object(entry, where)
        config_path = expect_str(item.get("Config"), f"{where} Config")
        raw_tags = item.get("RepoTags")
        tags = [] if raw_tags is None else expect_list(raw_tags, f"{where} RepoTags")
        references = []
        for tag in tags:
            parsed = Reference.parse(expect_str(tag, f"{where} RepoTags"), default_tag=None)
            if parsed.tag is None:
                raise FormatError(f"{where}: RepoTags entry {tag!r} is not a name:tag")
            references.append(str(parsed))
        layer_paths = [
            expect_str(p, f"{where} Layers")
            for p in expect_list(item.get("Layers"), f"{where} Layers")
        ]
        config = self.files.read(config_path, f"{where} Config")
        _check_named_digest(config_path, config, f"{name}: config {config_path!r}")
        diff_ids = config_diff_ids(
            expect_object(decode_json(config, f"{name}: config"), f"{name}: config"),
            f"{name}: config",
        )
        if len(diff_ids) != len(layer_paths):
            raise FormatError(
                f"{name}: manifest.json lists {len(layer_paths)} layers but the config has "
                f"{len(diff_ids)} diff_ids"
            )
        layers = []
        resolved = []
        for index, (path, diff_id) in enumerate(zip(layer_paths, diff_ids, strict=True)):
            what = f"{name}: layer {index + 1}"
            real = self.files.resolve(path, what)
            size = self.files.size(real, what)
            match = _BLOB.match(real)
            layers.append(
                LayerDesc(
                    diff_id=diff_id,
                    digest="sha256:" + match.group(1) if match else None,
                    size=size,
                    media_type=blob_layer_type(self.files.head(real, 6)),
                )
            )
            resolved.append(real)
        image = SourceImage(config=config, layers=layers, references=references, name=name)
        image.extra["layer_paths"] = resolved
        parent = item.get("Parent")
        if isinstance(parent, str) and re.fullmatch(r"sha256:[a-f0-9]{64}", parent):
            image.parent = parent
        return image

    # -- legacy --------------------------------------------------------------------------

    def _legacy_dirs(self) -> list[str]:
        dirs = []
        for member in self.files.names():
            match = _LEGACY_JSON.match(member)
            if match:
                dirs.append(match.group(1))
        return sorted(set(dirs))

    def _legacy(self) -> list[SourceImage]:
        nodes: dict[str, tuple[bytes, dict[str, Any]]] = {}
        broken: dict[str, LayerfsError] = {}
        for dir_name in self._legacy_dirs():
            try:
                nodes[dir_name] = self._legacy_node(dir_name)
            except LayerfsError as exc:
                broken[dir_name] = exc
        references: dict[str, list[str]] = {}
        if self.files.exists("repositories"):
            for ref, image_id in self._repositories():
                references.setdefault(image_id, []).append(ref)
        parents = {doc.get("parent") for _, doc in nodes.values()}
        tops = [i for i in nodes if i not in parents]
        tops += [i for i in references if i not in tops]
        tops += _cycles(nodes, tops)
        images = []
        for top in sorted(tops):
            name = references[top][0] if references.get(top) else top[:12]
            try:
                if top in broken:
                    raise broken[top]
                if top not in nodes:
                    raise FormatError(
                        f"repositories names image {top[:12]}, which is not in the archive"
                    )
                images.append(self._legacy_image(top, nodes, broken, references.get(top, []), name))
            except LayerfsError as exc:
                self._reject(name, exc)
        for dir_name, error in broken.items():
            if dir_name not in tops:
                self._reject(dir_name[:12], error)
        return images

    def _legacy_node(self, dir_name: str) -> tuple[bytes, dict[str, Any]]:
        where = f"{dir_name[:12]}/json"
        if not _ID.match(dir_name):
            raise FormatError(f"legacy image directory {dir_name!r} is not a 64-hex image ID")
        raw = self.files.read(f"{dir_name}/json", where)
        doc = expect_object(decode_json(raw, where), where)
        stored = doc.get("id", dir_name)
        if stored != dir_name:
            raise FormatError(f"{where}: has id {str(stored)[:70]!r}, not its directory's name")
        parent = doc.get("parent")
        if parent not in (None, "") and not (isinstance(parent, str) and _ID.match(parent)):
            raise FormatError(f"{where}: parent {str(parent)[:70]!r} is not a 64-hex image ID")
        if not self.files.exists(f"{dir_name}/layer.tar"):
            raise FormatError(f"legacy image {dir_name[:12]} has no layer.tar")
        return raw, doc

    def _repositories(self) -> list[tuple[str, str]]:
        """(``repo:tag`` or ``repo@digest``, image ID) pairs, tags before digests."""
        doc = expect_object(
            decode_json(self.files.read("repositories", "repositories"), "repositories"),
            "repositories",
        )
        tags, digests = [], []
        for repo, refs in doc.items():
            for ref, image_id in expect_object(refs, f"repositories {repo!r}").items():
                expect_str(image_id, f"repositories {repo}:{ref}")
                if ":" in ref:
                    # A digest key, as Docker 1.8/1.9 saved them next to the tags.
                    try:
                        digests.append((str(Reference.parse(f"{repo}@{ref}")), image_id))
                    except LayerfsError as exc:
                        log.warning(
                            "%s: ignoring digest %s of %s: %s",
                            self.description,
                            ref[:80],
                            repo[:80],
                            exc.message,
                        )
                    continue
                tags.append((str(Reference.parse(f"{repo}:{ref}")), image_id))
        return tags + digests

    def _legacy_image(
        self,
        top: str,
        nodes: dict[str, tuple[bytes, dict[str, Any]]],
        broken: dict[str, LayerfsError],
        references: list[str],
        name: str,
    ) -> SourceImage:
        chain: list[str] = []
        current: str | None = top
        while current:
            if current in chain:
                raise FormatError(f"the legacy chain of {top[:12]} has a cycle at {current[:12]}")
            if current in broken:
                raise broken[current]
            if current not in nodes:
                break  # a parent outside the archive must already be in the store
            chain.append(current)
            if len(chain) > MAX_IMAGE_DEPTH:
                raise DepthLimitError(
                    f"max depth exceeded: the legacy chain of {top[:12]} is deeper than "
                    f"{MAX_IMAGE_DEPTH}"
                )
            parent = nodes[current][1].get("parent")
            current = parent if isinstance(parent, str) else None
        chain.reverse()
        layers = []
        images = []
        for node_id in chain:
            raw, doc = nodes[node_id]
            diff_id = self._hash_layer(f"{node_id}/layer.tar", f"{name}: layer of {node_id[:12]}")
            size = self.files.size(f"{node_id}/layer.tar")
            real = self.files.resolve(f"{node_id}/layer.tar", name)
            layers.append(
                LayerDesc(
                    diff_id=diff_id,
                    size=size,
                    media_type=blob_layer_type(self.files.head(real, 6)),
                )
            )
            parent = doc.get("parent") or ""
            images.append(Image(id=node_id, parent=parent, layer=diff_id, raw_json=raw, data=doc))
        config = config_from_chain(images, [layer.diff_id or "" for layer in layers])
        image = SourceImage(
            config=config,
            layers=layers,
            references=references,
            name=name,
            legacy=[LegacyNode(i.id, i.raw_json) for i in images],
        )
        image.extra["layer_paths"] = [f"{i}/layer.tar" for i in chain]
        return image

    def _hash_layer(self, path: str, what: str) -> str:
        """The diff ID of a legacy layer (it has no config to name it)."""
        digest = hashlib.sha256()
        with self.files.open(path, what) as handle:
            reader, _ = open_decompressed(handle, what)
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
        return "sha256:" + digest.hexdigest()


def _cycles(nodes: dict[str, tuple[bytes, dict[str, Any]]], tops: list[str]) -> list[str]:
    """One node of each parent cycle no top reaches (so that it is reported, not ignored)."""
    covered: set[str] = set()
    for top in tops:
        current: Any = top
        while isinstance(current, str) and current in nodes and current not in covered:
            covered.add(current)
            current = nodes[current][1].get("parent")
    found = []
    for node_id in sorted(nodes):
        if node_id in covered:
            continue
        found.append(node_id)
        current = node_id
        while isinstance(current, str) and current in nodes and current not in covered:
            covered.add(current)
            current = nodes[current][1].get("parent")
    return found


def _parents_first(images: list[SourceImage]) -> list[SourceImage]:
    """Keep a ``Parent`` only when it is another image of the archive; parents go first."""
    by_config = {i.config_digest: i for i in images}
    for image in images:
        if image.parent is not None and (
            image.parent not in by_config or image.parent == image.config_digest
        ):
            image.parent = None
    ordered: list[SourceImage] = []
    placed: set[str] = set()

    def place(image: SourceImage, seen: set[str]) -> None:
        digest = image.config_digest
        if digest in placed:
            return
        if image.parent is not None:
            if image.parent in seen:  # a cycle of Parents: none of them counts
                image.parent = None
            else:
                place(by_config[image.parent], seen | {digest})
        if digest not in placed:
            placed.add(digest)
            ordered.append(image)

    for image in images:
        place(image, set())
    return ordered


def _entry_name(entry: Any, number: int) -> str:
    """How messages name a manifest.json entry: its first tag, else its position."""
    if isinstance(entry, dict):
        tags = entry.get("RepoTags")
        if isinstance(tags, list) and tags and isinstance(tags[0], str) and len(tags[0]) < 200:
            return tags[0]
    return f"image {number}"


def _check_named_digest(path: str, data: bytes, what: str) -> None:
    """A file named after a digest (``<hex>.json``, ``blobs/sha256/<hex>``) must hash to it."""
    match = _HEX_JSON.match(path) or _BLOB.match(path)
    if match is None:
        return
    actual = sha256_digest(data)
    if actual[7:] != match.group(1):
        raise FormatError(
            f"{what}: config digest mismatch: named sha256:{match.group(1)}, got {actual}"
        )


# -- writing -------------------------------------------------------------------------------


class DockerManifest:
    """``manifest.json`` and ``repositories`` as Docker's json.Encoder writes them.

    Docker writes ``Parent`` for an image whose parent (in its image store: the image of
    the previous build step) is saved in the same archive. layerfs keeps no such link, so
    it writes the rule Docker's loader checks a ``Parent`` against: another image of the
    archive whose history is this image's minus its last entry, and whose layers are a
    prefix of this image's.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[SourceImage, str]] = []  # image, entry without "}"
        self.repositories: dict[str, dict[str, str]] = {}

    def add(
        self,
        image: SourceImage,
        config: str,
        tags: list[Reference],
        layers: list[str],
        top: str | None,
    ) -> None:
        repo_tags = "null" if not tags else "[" + ",".join(go_quote(str(t)) for t in tags) + "]"
        self.entries.append(
            (
                image,
                '{"Config":'
                + go_quote(config)
                + ',"RepoTags":'
                + repo_tags
                + ',"Layers":['
                + ",".join(go_quote(p) for p in layers)
                + "]",
            )
        )
        if top is not None:
            for tag in tags:
                self.repositories.setdefault(tag.repository, {})[tag.tag or "latest"] = top

    def _parent(self, image: SourceImage) -> str | None:
        doc = image.config_json()
        history, diff_ids = doc.get("history") or [], doc.get("rootfs", {}).get("diff_ids", [])
        for other, _ in self.entries:
            if other.config_digest == image.config_digest:
                continue
            candidate = other.config_json()
            before = candidate.get("history") or []
            layers = candidate.get("rootfs", {}).get("diff_ids", [])
            if (
                before
                and len(history) == len(before) + 1
                and history[: len(before)] == before
                and diff_ids[: len(layers)] == layers
            ):
                return other.config_digest
        return None

    def manifest_bytes(self) -> bytes:
        items = []
        for image, item in self.entries:
            parent = self._parent(image)
            if parent is not None:
                item += ',"Parent":' + go_quote(parent)
            items.append(item + "}")
        return ("[" + ",".join(items) + "]\n").encode()

    def repositories_bytes(self) -> bytes | None:
        if not self.repositories:
            return None
        parts = []
        for repo in sorted(self.repositories):
            tags = self.repositories[repo]
            inner = ",".join(go_quote(t) + ":" + go_quote(tags[t]) for t in sorted(tags))
            parts.append(go_quote(repo) + ":{" + inner + "}")
        return ("{" + ",".join(parts) + "}\n").encode()


class DockerArchiveDestination(LayoutDestination):
    """Writes a docker-archive (Docker 1.10-24 layout) through a :class:`LayoutWriter`."""

    kind = "docker-archive"

    def __init__(
        self, writer: LayoutWriter, *, tmp_dir: Path | None = None, reference: str | None = None
    ) -> None:
        super().__init__(writer, tmp_dir=tmp_dir, reference=reference)
        self.manifest = DockerManifest()
        self._layers: dict[str, str] = {}  # diff ID -> path of its layer.tar
        self._v1: list[tuple[str, bytes]] = []

    def _override(self) -> Reference | None:
        return Reference.parse(self.reference) if self.reference else None

    def _start_image(self, plan: ImagePlan) -> None:
        legacy = plan.image.legacy
        if legacy:
            if len(legacy) != len(plan.image.layers):
                raise FormatError(f"{plan.image.name}: legacy chain and layers differ in length")
            self._v1 = [(n.id, n.json) for n in legacy]
        else:
            self._v1 = v1_layers(plan.config, plan.diff_ids)

    def has_layer(self, layer: LayerDesc) -> bool:
        return layer.diff_id is not None and layer.diff_id in self._layers

    def _layer_dir(self, v1_id: str, json_bytes: bytes, mtime: int) -> None:
        self.writer.add_dir(v1_id, mtime)
        self.writer.add_bytes(f"{v1_id}/VERSION", b"1.0", mtime)
        self.writer.add_bytes(f"{v1_id}/json", json_bytes, mtime)

    def _layer_name(self, plan: ImagePlan, index: int, diff_id: str) -> str:
        v1_id, json_bytes = self._v1[index]
        self._layer_dir(v1_id, json_bytes, plan.mtime)
        return f"{v1_id}/layer.tar"

    def _layer_written(self, plan: ImagePlan, index: int, written: WrittenLayer) -> None:
        self._layers[written.diff_id] = written.name

    def put_image(self, image: SourceImage) -> None:
        plan = self._current(image)
        paths = []
        for (v1_id, json_bytes), diff_id in zip(self._v1, plan.diff_ids, strict=True):
            path = f"{v1_id}/layer.tar"
            if not self.writer.has(path):
                first = self._layers.get(diff_id)
                if first is None:
                    raise FormatError(f"{image.name}: layer {diff_id} was never written")
                self._layer_dir(v1_id, json_bytes, plan.mtime)
                self.writer.add_symlink(path, f"../{first}", plan.mtime)
            paths.append(path)
        config_name = f"{image.config_digest[7:]}.json"
        if not self.writer.has(config_name):
            self.writer.add_bytes(config_name, image.config, plan.mtime)
        top = self._v1[-1][0] if self._v1 else None
        self.manifest.add(image, config_name, plan.tags, paths, top)
        self._plan = None

    def _finish(self) -> None:
        self.writer.add_bytes("manifest.json", self.manifest.manifest_bytes(), 0)
        repositories = self.manifest.repositories_bytes()
        if repositories is not None:
            self.writer.add_bytes("repositories", repositories, 0)


def containerd_name(tag: Reference) -> str:
    """The full name containerd records: ``docker.io/library/busybox:latest``."""
    return f"{full_name(tag.repository)}:{tag.tag or 'latest'}"
