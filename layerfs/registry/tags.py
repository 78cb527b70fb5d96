"""A repository's tags (``GET /v2/<name>/tags/list``), every page, for ``pull --all-tags``.

The registry answers ``{"name": ..., "tags": [...]}`` a page at a time; the next page is
the ``Link: <url>; rel="next"`` header (distribution's pagination), followed until there
is none. Tags come back sorted, as the API says they are.
"""

from __future__ import annotations

import json
import re

from layerfs.errors import RegistryError, UsageError
from layerfs.model.reference import Reference
from layerfs.registry.auth import repository_scope
from layerfs.registry.client import RegistryClient, RegistryOptions

MAX_PAGES = 1000  # 100 tags a page by default: a bound, not a limit anyone meets
_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def list_tags(client: RegistryClient, remote_name: str) -> list[str]:
    """Every tag of ``remote_name`` (``library/busybox``) in ``client``'s registry."""
    path: str | None = f"/v2/{remote_name}/tags/list"
    scopes = [repository_scope(remote_name, "pull")]
    tags: list[str] = []
    what = f"list the tags of {client.registry}/{remote_name}"
    for _ in range(MAX_PAGES):
        if path is None:
            break
        response = client.request("GET", path, scopes=scopes, what=what)
        with response:
            try:
                doc = json.loads(response.content)
            except ValueError as exc:
                raise RegistryError(f"{what}: the registry sent no JSON: {exc}") from exc
            link = response.headers.get("Link", "")
        page = doc.get("tags") if isinstance(doc, dict) else None
        if page is not None and not (
            isinstance(page, list) and all(isinstance(t, str) for t in page)
        ):
            raise RegistryError(f"{what}: 'tags' is not a list of strings")
        tags.extend(t for t in page or [] if t not in tags)
        match = _NEXT.search(link)
        path = match.group(1) if match else None
    return sorted(tags)


def repository_tags(name: str, options: RegistryOptions | None = None) -> list[str]:
    """The tags of the repository ``name`` (``host/team/app``, ``busybox``) names."""
    reference = Reference.parse(name, default_tag=None)
    if reference.tag or reference.digest:
        raise UsageError(f"tag can't be used with --all-tags/-a: {name!r}")
    client = RegistryClient(reference.registry, options)
    try:
        return list_tags(client, reference.remote_name)
    finally:
        client.close()
