"""The union mount: the merged tree, the writable layer, and two engines that serve them.

``native/`` speaks the kernel's FUSE protocol on /dev/fuse itself (the default);
``pyfuse3_engine.py`` serves through libfuse, and is the only module that imports
pyfuse3 and trio. Both call ``operations.py``, which knows neither.
"""

#: The engines a mount can be served by, the default first.
ENGINES = ("native", "pyfuse3")
