"""Fetching a stored layer again from a registry it was pulled from (``fsck --repair``).

The store remembers, per compressed blob, the registries and repositories that hold
it (:class:`layerfs.store.blobrecords.BlobRecords`) and, per layer, the compressed
digests it is known by. A layer that ``fsck --verify`` found damaged is streamed
again from the first of those that answers, checked against its diff ID, and put in
place of the damaged copy file by file (:meth:`StagedLayer.publish`).
"""

from __future__ import annotations

import logging

from layerfs.errors import LayerfsError
from layerfs.registry.blobs import Repository
from layerfs.registry.client import RegistryClient, RegistryOptions
from layerfs.store.blobrecords import BlobRecords
from layerfs.store.store import Store

log = logging.getLogger(__name__)


def refetch_layer(store: Store, diff_id: str, options: RegistryOptions | None = None) -> str | None:
    """Replace the layer with its blob from a registry; the repository used, or None."""
    try:
        digests = store.layers.info(diff_id).blob_digests
    except LayerfsError:
        return None
    records = BlobRecords(store)
    for digest in digests:
        record = records.get(digest)
        if record is None or (record.diff_id and record.diff_id != diff_id):
            continue
        for repository in record.repositories:
            host, _, remote = repository.partition("/")
            client = RegistryClient(host, options)
            try:
                reader = Repository(client, remote).open_blob(digest, record.size)
                try:
                    staged = store.layers.ingest(
                        reader, expected_diff_id=diff_id, what=f"layer {diff_id} from {repository}"
                    )
                finally:
                    reader.close()
                try:
                    with store.graph.transaction():
                        staged.publish()  # replaces the damaged copy
                finally:
                    staged.discard()
                return repository
            except LayerfsError as exc:
                log.warning("cannot fetch layer %s again from %s: %s", diff_id, repository, exc)
            finally:
                client.close()
    return None
