"""Docker's output contract: Go templates (``--format``), tables and the units docker prints.

- ``template``: a Go ``text/template`` engine with docker's template functions;
- ``values``: how Go prints, compares and JSON-encodes the values templates see;
- ``tabwriter``: Go's ``text/tabwriter``, which aligns docker's tables;
- ``output``: the ``--format`` contract of docker's listings (``table``, ``json``, a
  template), the field contexts and go-units' sizes and durations.

Nothing here touches the store; commands import this package only when they print.
"""
