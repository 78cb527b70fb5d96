"""layerfs's own FUSE engine: the kernel's protocol on /dev/fuse, no libfuse.

``protocol`` (structures, constants, decoding), ``device`` (mounting, device
ioctls), ``session`` (INIT, the workers, INTERRUPT), ``handlers`` (each request
as calls of ``fs.operations``), ``engine`` (what ``fs.mount`` uses).
"""
