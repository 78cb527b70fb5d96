"""What ``images`` lists: image summaries, docker's filters and its rows per name.

:func:`list_images` follows the daemon's ``ImageList``: every image of the store (only
the heads with ``dangling=true``), filtered by ``before``/``since`` (creation time against
a named image), ``label`` (every ``K`` or ``K=V`` given must match) and ``reference``
(Go's ``path.Match`` on ``repo:tag``/``repo@digest`` or on the repository name; an image
keeps only its matching names); an image with no name is listed when it has no children
(or with ``all``) and is then ``<none>``. Newest first. :func:`image_rows` expands a
summary into docker's rows: one per tag (times each digest of its repository with
``--digests``), then one per repository that has only digests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from layerfs.errors import UsageError
from layerfs.model.image import Image, parse_created
from layerfs.store.store import Store
from layerfs.store.summaries import NodeSummary

IMAGE_FILTERS = ("dangling", "label", "before", "since", "reference")
NONE = "<none>"


@dataclass
class ImageSummary:
    """One image as ``images`` sees it (docker's ImageSummary)."""

    image: NodeSummary  # its node's parent, layer, size and created (no JSON read)
    repo_tags: list[str]  # "repo:tag", only the names that passed a reference filter
    repo_digests: list[str]  # "repo@sha256:..."
    size: int  # the whole chain's, as docker reports it
    created: datetime | None

    @property
    def id(self) -> str:
        return "sha256:" + self.image.id

    @property
    def created_unix(self) -> int:
        return int(self.created.timestamp()) if self.created else 0


@dataclass
class ImageRow:
    """One line of ``images``: a repository, a tag and a digest of one image."""

    summary: ImageSummary
    repository: str
    tag: str
    digest: str


Filters = dict[str, list[str]]


def parse_filters(values: list[str], accepted: tuple[str, ...]) -> Filters:
    """``--filter KEY=VALUE`` arguments as docker reads them (key lower-cased, trimmed)."""
    filters: Filters = {}
    for value in values:
        if not value:
            continue
        if "=" not in value:
            raise UsageError(f"bad format of filter {value!r} (expected name=value)")
        key, _, item = value.partition("=")
        key = key.strip().lower()
        if key not in accepted:
            raise UsageError(f"invalid filter {key!r}: use one of {', '.join(accepted)}")
        filters.setdefault(key, []).append(item.strip())
    return filters


def bool_filter(filters: Filters, key: str) -> bool | None:
    """The value of a true/false filter (``dangling``), None when it is not given."""
    values = filters.get(key)
    if not values:
        return None
    words = {v.lower() for v in values}
    if words <= {"true", "1"}:
        return True
    if words <= {"false", "0"}:
        return False
    raise UsageError(f"invalid filter '{key}={'|'.join(values)}': use {key}=true or {key}=false")


def match_labels(filters: Filters, labels: dict[str, Any], key: str = "label") -> bool:
    """docker's MatchKVList: every ``K`` or ``K=V`` of the filter is among ``labels``."""
    wanted = filters.get(key)
    if not wanted:
        return True
    if not labels:
        return False
    for item in wanted:
        name, sep, value = item.partition("=")
        if name not in labels:
            return False
        if sep and labels[name] != value:
            return False
    return True


def labels_of(image: Image) -> dict[str, Any]:
    labels = image.config.get("Labels")
    return labels if isinstance(labels, dict) else {}


def list_images(
    store: Store, *, all_images: bool = False, filters: Filters | None = None
) -> list[ImageSummary]:
    """The images ``images`` shows, newest first (see the module docstring)."""
    filters = filters or {}
    dangling = bool_filter(filters, "dangling")
    before = _reference_time(store, filters.get("before"))
    since = _reference_time(store, filters.get("since"))
    patterns = [compile_pattern(p) for p in filters.get("reference", [])]
    # The node summaries, not every node's JSON: on a store of thousands of images the
    # listing reads one cache file (docs/store-format.md, "Indexes"). Without -a only the
    # leaves and the named nodes can be listed: the others are not even looked at.
    view = store.graph.view()
    names = store.tags.by_id()
    if all_images:
        candidates: Iterable[str] = view
    else:
        candidates = view.leaves | {i for i in names if i in view}
    result: list[ImageSummary] = []
    for image_id in candidates:
        is_parent = view.is_parent(image_id)
        if dangling and is_parent:
            continue  # dangling=true looks at the heads only
        image = view.summary(image_id)
        # The cheap tests first: most nodes of a big store are hidden intermediate ones.
        if before is not None or since is not None:
            created = parse_created(image.created)
            if before is not None and (created is None or created >= before):
                continue
            if since is not None and (created is None or created <= since):
                continue
        tags: list[str] = []
        digests: list[str] = []
        for ref in names.get(image_id, []):
            if patterns and not any(_matches(p, ref) for p in patterns):
                continue
            (digests if "@" in ref else tags).append(ref)
        if not tags and not digests:
            if not (all_images or not is_parent):
                continue
            if dangling is False or patterns:
                continue
        elif dangling and tags:
            continue
        if "label" in filters and not match_labels(filters, labels_of(store.graph.get(image_id))):
            continue
        created = parse_created(image.created)
        result.append(ImageSummary(image, tags, digests, view.chain_size(image_id), created))
    result.sort(key=lambda s: (s.created.timestamp() if s.created else 0, s.image.id), reverse=True)
    return result


def _reference_time(store: Store, values: list[str] | None) -> datetime | None:
    """The creation time of the image a ``before``/``since`` filter names (the last one)."""
    if not values:
        return None
    image = store.tags.lookup_image(values[-1])
    created = parse_created(image.created)
    if created is None:
        raise UsageError(f"image {values[-1]} has no creation time to compare with")
    return created


def image_rows(summary: ImageSummary, *, digests: bool) -> list[ImageRow]:
    """docker's rows for one image: per tag (and digest), then digest-only repositories."""
    if not summary.repo_tags and not summary.repo_digests:
        return [ImageRow(summary, NONE, NONE, NONE)]
    tags: dict[str, list[str]] = {}
    for ref in summary.repo_tags:
        repo, _, tag = ref.rpartition(":")
        tags.setdefault(repo, []).append(tag)
    by_repo: dict[str, list[str]] = {}
    for ref in summary.repo_digests:
        repo, _, digest = ref.partition("@")
        by_repo.setdefault(repo, []).append(digest)
    rows: list[ImageRow] = []
    for repo in sorted(tags):
        repo_digests = by_repo.pop(repo, []) if digests else []
        by_repo.pop(repo, None)
        for tag in sorted(tags[repo]):
            if not repo_digests:
                rows.append(ImageRow(summary, repo, tag, NONE))
            for digest in repo_digests:
                rows.append(ImageRow(summary, repo, tag, digest))
    for repo in sorted(by_repo):
        if digests:
            rows.extend(ImageRow(summary, repo, NONE, d) for d in by_repo[repo])
        else:
            rows.append(ImageRow(summary, repo, NONE, ""))
    return rows


# -- reference patterns ------------------------------------------------------------------------


@dataclass
class Pattern:
    text: str
    regex: re.Pattern[str] = field(repr=False)


def compile_pattern(pattern: str) -> Pattern:
    """Go's ``path.Match`` pattern: ``*`` and ``?`` stop at ``/``, ``[...]``, ``\\`` escapes."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\":
            if i + 1 >= len(pattern):
                raise _bad_pattern(pattern)
            i += 1
            out.append(re.escape(pattern[i]))
        elif ch == "[":
            i, cls = _char_class(pattern, i)
            out.append(cls)
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return Pattern(pattern, re.compile("".join(out), re.DOTALL))


def _char_class(pattern: str, start: int) -> tuple[int, str]:
    i = start + 1
    negate = pattern[i : i + 1] == "^"
    if negate:
        i += 1
    parts: list[str] = []
    first = True
    while True:
        if i >= len(pattern):
            raise _bad_pattern(pattern)
        if pattern[i] == "]" and not first:
            break
        lo, i = _class_char(pattern, i)
        if pattern[i : i + 1] == "-":
            hi, i = _class_char(pattern, i + 1)
            if hi < lo:
                raise _bad_pattern(pattern)
            parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
        else:
            parts.append(re.escape(lo))
        first = False
    return i + 1, "[" + ("^" if negate else "") + "".join(parts) + "]"


def _class_char(pattern: str, i: int) -> tuple[str, int]:
    if i >= len(pattern) or pattern[i] in "-]":
        raise _bad_pattern(pattern)
    if pattern[i] == "\\":
        if i + 1 >= len(pattern):
            raise _bad_pattern(pattern)
        return pattern[i + 1], i + 2
    return pattern[i], i + 1


def _bad_pattern(pattern: str) -> UsageError:
    return UsageError(f"invalid reference filter {pattern!r}: syntax error in pattern")


def _matches(pattern: Pattern, ref: str) -> bool:
    """docker's FamiliarMatch: the whole ``repo:tag``/``repo@digest``, or the repository."""
    if pattern.regex.fullmatch(ref):
        return True
    repo = ref.partition("@")[0] if "@" in ref else ref.rpartition(":")[0]
    return bool(pattern.regex.fullmatch(repo))
