"""Go's ``text/tabwriter`` with the settings docker's tables use.

docker writes a table through ``tabwriter.NewWriter(out, 10, 1, 3, ' ', 0)``: cells end at a
tab, a column is as wide as its widest cell plus 3 and at least 10, the last cell of a line
is not part of any column and is never padded. A column spans a *block* of consecutive
lines that have a cell in it, so a short line ends the columns to its right; this is Go's
algorithm, kept so that the output is docker's byte for byte.
"""

from __future__ import annotations

MIN_WIDTH = 10
PADDING = 3


def align(text: str, min_width: int = MIN_WIDTH, padding: int = PADDING) -> str:
    """Align the tab-separated cells of ``text`` as Go's tabwriter does, then flush."""
    lines = [line.split("\t") for line in text.split("\n")]
    out: list[str] = []
    _format(lines, 0, len(lines), [], min_width, padding, out)
    return "\n".join(out)


def _format(
    lines: list[list[str]],
    line0: int,
    line1: int,
    widths: list[int],
    min_width: int,
    padding: int,
    out: list[str],
) -> None:
    column = len(widths)
    this = line0
    while this < line1:
        if column >= len(lines[this]) - 1:
            this += 1
            continue
        # A block of lines with a cell in this column starts here.
        _write(lines, line0, this, widths, out)
        line0 = this
        width = min_width
        while this < line1 and column < len(lines[this]) - 1:
            width = max(width, len(lines[this][column]) + padding)
            this += 1
        _format(lines, line0, this, [*widths, width], min_width, padding, out)
        line0 = this
    _write(lines, line0, line1, widths, out)


def _write(
    lines: list[list[str]], line0: int, line1: int, widths: list[int], out: list[str]
) -> None:
    for cells in lines[line0:line1]:
        parts = []
        for index, cell in enumerate(cells):
            if index < len(widths):
                parts.append(cell.ljust(widths[index]))
            else:
                parts.append(cell)
        out.append("".join(parts))
