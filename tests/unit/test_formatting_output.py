"""Tests for layerfs.formatting's output side: Go's tabwriter, docker's --format contract,
go-units' sizes and durations, and the listing contexts with docker's field names."""

from __future__ import annotations

import json

import pytest

from layerfs.errors import TemplateError
from layerfs.formatting import contexts, tabwriter
from layerfs.formatting.output import (
    human_duration,
    human_size,
    listing_size,
    preformat,
    render,
    truncate_id,
)
from layerfs.formatting.values import duration_string, float_string

IMAGE_ID = "sha256:" + "ab" * 32
CREATED = 1_700_000_000


def image_row(repo: str = "ex/bb", tag: str = "1", digest: str = "<none>", **kw: object):
    return contexts.image_context(
        IMAGE_ID, repo, tag, digest, CREATED, 1_982_391, trunc=True, now=CREATED + 90, **kw
    )


# -- tabwriter ---------------------------------------------------------------------------------


def test_columns_are_the_widest_cell_plus_three_and_at_least_ten() -> None:
    text = "REPOSITORY\tTAG\tSIZE\nex/bb\t1\t1.98MB\n"
    assert tabwriter.align(text) == (
        "REPOSITORY   TAG       SIZE\n"  # TAG is 3 wide: padded to the minimum of 10
        "ex/bb        1         1.98MB\n"
    )


def test_the_last_cell_of_a_line_is_never_padded() -> None:
    assert tabwriter.align("a\tb\n") == "a         b\n"
    assert tabwriter.align("only\n") == "only\n"


def test_a_shorter_line_ends_the_column_block() -> None:
    # Go: the second column's block is lines 1-2; line 3 has no second cell, so line 4
    # starts a new block with its own width.
    text = "a\tbbbbbbbbbbbbbbbb\tc\nd\te\tf\nno tabs\ng\th\ti\n"
    assert tabwriter.align(text).splitlines() == [
        "a         bbbbbbbbbbbbbbbb   c",
        "d         e                  f",
        "no tabs",
        "g         h         i",
    ]


def test_empty_cells_are_padded() -> None:
    assert tabwriter.align("a\t\tc\n") == "a                   c\n"


# -- the --format contract ------------------------------------------------------------------


def test_preformat_reads_table_json_and_escapes() -> None:
    assert preformat("table {{.ID}}\\t{{.Tag}}") == ("{{.ID}}\t{{.Tag}}", True)
    assert preformat("json") == ("{{json .}}", False)
    assert preformat("  {{.ID}}\\n ") == ("{{.ID}}\n", False)


def test_default_table_matches_docker_images() -> None:
    text = render(
        [image_row(), image_row(repo="other/bb")],
        None,
        contexts.IMAGE_HEADERS,
        default_table=contexts.IMAGE_TABLE,
    )
    assert text == (
        "REPOSITORY   TAG       IMAGE ID       CREATED              SIZE\n"
        "ex/bb        1         abababababab   About a minute ago   1.98MB\n"
        "other/bb     1         abababababab   About a minute ago   1.98MB\n"
    )


def test_an_empty_table_still_has_its_header() -> None:
    text = render([], "table {{.ID}}\\t{{.Size}}", contexts.IMAGE_HEADERS, default_table="")
    assert text == "IMAGE ID   SIZE\n"


def test_custom_table_headers_come_from_the_same_template() -> None:
    text = render(
        [image_row()],
        'table {{.Repository}}:{{.Tag}}\\t{{upper .VirtualSize}}\\t{{printf "%.3s" .ID}}',
        contexts.IMAGE_HEADERS,
        default_table="",
    )
    # The header runs the template on the header names (docker's identity functions).
    assert text.splitlines() == [
        "REPOSITORY:TAG   VIRTUAL SIZE   IMA",
        "ex/bb:1          1.982MB        aba",
    ]


def test_an_unknown_field_is_an_error_even_in_a_table() -> None:
    with pytest.raises(TemplateError, match="can't evaluate field Nope in type image"):
        render([image_row()], "table {{.Nope}}", contexts.IMAGE_HEADERS, default_table="")


def test_json_is_every_field_sorted_with_html_escaped() -> None:
    line = render([image_row()], "json", contexts.IMAGE_HEADERS, default_table="")
    assert line.endswith("\n") and "\\u003cnone\\u003e" in line
    assert json.loads(line) == {
        "Containers": "N/A",
        "CreatedAt": contexts.go_time_string(CREATED),
        "CreatedSince": "About a minute ago",
        "Digest": "<none>",
        "ID": "abababababab",
        "Repository": "ex/bb",
        "SharedSize": "N/A",
        "Size": "1.98MB",
        "Tag": "1",
        "UniqueSize": "N/A",
        "VirtualSize": "1.982MB",
    }


def test_image_format_rules() -> None:
    assert contexts.image_format(None, digests=False, quiet=True) == "{{.ID}}"
    assert contexts.image_format("table", digests=True, quiet=False) == (
        contexts.IMAGE_TABLE_DIGESTS
    )
    assert contexts.image_format("table {{.ID}}", digests=True, quiet=False) == (
        "table {{.ID}}\\t{{.Digest}}"
    )
    # -q does not override a format of one's own, as in docker.
    assert contexts.image_format("{{.Tag}}", digests=False, quiet=True) == "{{.Tag}}"


def test_history_context_truncates_and_humanizes_like_docker() -> None:
    made_by = "/bin/sh -c #(nop) \tCOPY file:0123456789abcdef0123456789 in /usr/local/bin/"
    row = contexts.history_context(
        IMAGE_ID, CREATED, made_by, 1234, "c", trunc=True, human=True, now=CREATED + 3 * 86400
    )
    values = row.values
    assert values["ID"] == "abababababab" and values["CreatedSince"] == "3 days ago"
    assert values["CreatedBy"] == made_by.replace("\t", " ")[:44] + "…"
    assert values["Size"] == "1.23kB"
    raw = contexts.history_context(
        "<missing>", CREATED, made_by, 1234, "", trunc=False, human=False
    ).values
    assert raw["ID"] == "<missing>" and raw["Size"] == "1234"
    assert raw["CreatedSince"] == raw["CreatedAt"] and "T" in raw["CreatedAt"]


def test_df_reclaimable_has_its_percentage() -> None:
    row = contexts.df_context("Images", 3, 1, 2_000_000, 500_000).values
    assert (row["Size"], row["Reclaimable"], row["TotalCount"]) == ("2MB", "500kB (25%)", "3")
    assert contexts.df_context("Mounts", 0, 0, 0, 0).values["Reclaimable"] == "0B"


# -- go-units ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "precision", "expected"),
    [
        (0, 4, "0B"),
        (999, 4, "999B"),
        (1000, 4, "1kB"),
        (1_982_391, 3, "1.98MB"),
        (1_982_391, 4, "1.982MB"),
        (999_900, 3, "1e+03kB"),  # go-units' own rounding quirk, kept
        (125_500_000, 3, "126MB"),
        (5 * 10**12, 4, "5TB"),
    ],
)
def test_human_size(size: int, precision: int, expected: str) -> None:
    assert human_size(size, precision) == expected


def test_listing_size_is_three_digits() -> None:
    assert listing_size(1_234_567) == "1.23MB"


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.5, "Less than a second"),
        (1, "1 second"),
        (59, "59 seconds"),
        (60, "About a minute"),
        (119, "About a minute"),
        (120, "2 minutes"),
        (3599, "59 minutes"),
        (3600, "About an hour"),
        (5400, "2 hours"),  # hours round: 1.5 h is 2 hours
        (47 * 3600, "47 hours"),
        (48 * 3600, "2 days"),
        (14 * 86400, "2 weeks"),
        (60 * 86400, "2 months"),
        (2 * 365 * 86400, "2 years"),
    ],
)
def test_human_duration(seconds: float, expected: str) -> None:
    assert human_duration(seconds) == expected


def test_truncate_id() -> None:
    assert truncate_id(IMAGE_ID) == "abababababab"
    assert truncate_id("abc") == "abc"


@pytest.mark.parametrize(
    ("ns", "expected"),
    [
        (0, "0s"),
        (1500, "1.5µs"),
        (500_000_000, "500ms"),
        (90 * 10**9, "1m30s"),
        (3600 * 10**9, "1h0m0s"),
        (1_500_000_000, "1.5s"),
    ],
)
def test_durations_print_as_go(ns: int, expected: str) -> None:
    assert duration_string(ns) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.5, "1.5"), (100000.0, "100000"), (1e6, "1e+06"), (0.0001, "0.0001"), (1e-5, "1e-05")],
)
def test_floats_print_as_go(value: float, expected: str) -> None:
    assert float_string(value) == expected
