"""The registry client: the v2 API's wire, auth, credentials, blobs and tags.

What the documents it carries mean is :mod:`layerfs.model.manifest`'s; pulling and pushing
images is the ``docker://`` transport (:mod:`layerfs.transports.registry`).
"""
