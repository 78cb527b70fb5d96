"""Tests for layerfs.formatting.template: Go's text/template with docker's functions.

The expected outputs are what Go's text/template and docker's CLI print for the same
template and data; the examples are those of docker's documentation ("Format command and
log output", "docker inspect", "docker images --format").
"""

from __future__ import annotations

from typing import Any

import pytest

from layerfs.errors import TemplateError
from layerfs.formatting.template import Template
from layerfs.formatting.values import NIL_MAP, NIL_PTR, NIL_SLICE, GoMap, GoStruct


def run(text: str, data: Any = None) -> str:
    return Template.parse(text).execute(data)


CONTAINER = {
    "Name": "/Web_App",
    "Image": "ubuntu:latest",
    "Args": ["-g", "daemon off;"],
    "LogPath": "/var/lib/docker/containers/abc/abc-json.log",
    "Config": {"Image": "nginx", "Env": ["PATH=/usr/bin", "A=1"]},
    "Mounts": [{"Type": "volume", "Destination": "/data", "RW": True}],
    "NetworkSettings": {
        "Networks": {
            "bridge": {"IPAddress": "172.17.0.2", "MacAddress": "02:42:ac:11:00:02"},
            "backend": {"IPAddress": "10.0.0.5", "MacAddress": "02:42:0a:00:00:05"},
        },
        "Ports": {
            "8787/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49153"}],
            "80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}],
        },
    },
}


# -- docker's documented examples --------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ('{{join .Args " , "}}', "-g , daemon off;"),
        ("{{json .Mounts}}", '[{"Destination":"/data","RW":true,"Type":"volume"}]'),
        ("{{lower .Name}}", "/web_app"),
        ('{{split .Image ":"}}', "[ubuntu latest]"),
        ("{{title .Name}}", "/Web_App"),
        ("{{upper .Name}}", "/WEB_APP"),
        (
            "{{range .NetworkSettings.Networks}}{{println .IPAddress}}{{end}}",
            "10.0.0.5\n172.17.0.2\n",  # a map ranges in key order
        ),
        ("{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", "10.0.0.5172.17.0.2"),
        (
            "{{range .NetworkSettings.Networks}}{{.MacAddress}}{{end}}",
            "02:42:0a:00:00:0502:42:ac:11:00:02",
        ),
        ("{{.LogPath}}", "/var/lib/docker/containers/abc/abc-json.log"),
        ("{{.Config.Image}}", "nginx"),
        (
            "{{range $p, $conf := .NetworkSettings.Ports}} {{$p}} -> {{(index $conf 0).HostPort}}"
            " {{end}}",
            " 80/tcp -> 8080  8787/tcp -> 49153 ",
        ),
        ('{{(index (index .NetworkSettings.Ports "8787/tcp") 0).HostPort}}', "49153"),
        ("{{json .Config}}", '{"Env":["PATH=/usr/bin","A=1"],"Image":"nginx"}'),
        ("{{ index (index .Config.Env) 0 }}", "PATH=/usr/bin"),
        ("{{.Config.Env}}", "[PATH=/usr/bin A=1]"),
    ],
)
def test_docker_documented_examples(template: str, expected: str) -> None:
    assert run(template, CONTAINER) == expected


def test_docker_pad_and_truncate() -> None:
    assert run('{{pad .Name 2 3}}|{{pad "" 2 3}}', CONTAINER) == "  /Web_App   |"
    assert run("{{truncate .Name 4}}|{{truncate .Name 40}}", CONTAINER) == "/Web|/Web_App"


def test_json_of_a_string_does_not_escape_html() -> None:
    # docker's json function turns off HTML escaping (json.Encoder.SetEscapeHTML(false)).
    assert run('{{json "<none> & co"}}') == '"<none> & co"'


def test_json_of_a_listing_context_is_sorted_and_escaped() -> None:
    row = GoStruct({"Tag": "<none>", "ID": "abc"}, type_name="image", context=True)
    assert run("{{json .}}", row) == '{"ID":"abc","Tag":"\\u003cnone\\u003e"}'


# -- Go's semantics ----------------------------------------------------------------------------


def test_text_and_fields() -> None:
    assert run("id={{.ID}} repo={{.Repository}}", {"ID": "1", "Repository": "r"}) == "id=1 repo=r"


def test_a_missing_map_key_is_no_value_and_nil_is_nil() -> None:
    assert run("{{.Missing}}|{{.Nil}}", {"Nil": None}) == "<no value>|<nil>"


def test_typed_nils_print_as_go_prints_them() -> None:
    data = GoStruct({"Env": NIL_SLICE, "Labels": NIL_MAP, "Health": NIL_PTR}, type_name="c")
    assert run("{{.Env}} {{.Labels}} {{.Health}} {{json .Env}} {{len .Labels}}", data) == (
        "[] map[] <nil> null 0"
    )


def test_struct_fields_and_unknown_fields() -> None:
    data = GoStruct({"A": 1, "B": [True, False], "C": GoStruct({"X": "x", "Y": ""})}, "t")
    assert run("{{.}}", data) == "{1 [true false] {x }}"
    with pytest.raises(TemplateError, match="can't evaluate field Nope in type t"):
        run("{{.Nope}}", data)


def test_typed_map_index_gives_its_zero_value() -> None:
    labels = GoMap({"a": "1"}, zero="")
    assert run('[{{index .L "a"}}][{{index .L "b"}}][{{.L.b}}]', {"L": labels}) == (
        "[1][][<no value>]"
    )


def test_if_else_if_else() -> None:
    template = "{{if eq .N 1}}one{{else if eq .N 2}}two{{else}}many{{end}}"
    assert [run(template, {"N": n}) for n in (1, 2, 3)] == ["one", "two", "many"]


@pytest.mark.parametrize(
    ("value", "truth"),
    [
        (0, False),
        (1, True),
        ("", False),
        ("x", True),
        ([], False),
        ([0], True),
        ({}, False),
        (None, False),
        (False, False),
        (NIL_SLICE, False),
        (GoStruct({}), True),
        (0.0, False),
    ],
)
def test_truth(value: Any, truth: bool) -> None:
    assert run("{{if .V}}yes{{else}}no{{end}}", {"V": value}) == ("yes" if truth else "no")


def test_with_sets_dot_and_else_with() -> None:
    assert run("{{with .A}}[{{.}}]{{else}}none{{end}}", {"A": "x"}) == "[x]"
    assert run("{{with .A}}[{{.}}]{{else with .B}}<{{.}}>{{end}}", {"A": "", "B": 2}) == "<2>"


def test_range_over_lists_maps_and_ints_with_else_break_continue() -> None:
    assert run("{{range $i, $v := .L}}{{$i}}={{$v}};{{end}}", {"L": ["a", "b"]}) == "0=a;1=b;"
    assert run("{{range .M}}{{.}}{{end}}", {"M": {"b": 2, "a": 1}}) == "12"
    assert run("{{range .L}}x{{else}}empty{{end}}", {"L": []}) == "empty"
    assert run("{{range .L}}x{{else}}empty{{end}}", {"L": NIL_SLICE}) == "empty"
    assert run("{{range 3}}{{.}}{{end}}") == "012"
    template = (
        "{{range .L}}{{if eq . 2}}{{continue}}{{end}}{{if eq . 4}}{{break}}{{end}}{{.}}{{end}}"
    )
    assert run(template, {"L": [1, 2, 3, 4, 5]}) == "13"


def test_variables_and_root() -> None:
    assert run('{{$x := "a"}}{{$x}}{{$x = "b"}}{{$x}}') == "ab"
    assert run("{{range .L}}{{$.Name}}:{{.}} {{end}}", {"Name": "n", "L": [1, 2]}) == "n:1 n:2 "
    # A variable declared in a control structure ends at its {{end}}.
    with pytest.raises(TemplateError, match='undefined variable "\\$y"'):
        run("{{if true}}{{$y := 1}}{{end}}{{$y}}")


def test_pipelines_pass_the_value_as_the_last_argument() -> None:
    assert run('{{.N | printf "%03d"}}', {"N": 7}) == "007"
    assert run('{{"abc" | upper | printf "%s!"}}') == "ABC!"
    assert run('{{(len .L) | printf "%d items"}}', {"L": [1, 2]}) == "2 items"


def test_and_or_are_lazy_and_return_an_operand() -> None:
    assert run('{{or .Empty "default"}}', {"Empty": ""}) == "default"
    assert run('{{and .A "second"}}', {"A": "x"}) == "second"
    # The unknown field after a decided "or" is never evaluated.
    assert run('{{or "yes" .Nope.Deeper}}', {}) == "yes"


def test_comparisons() -> None:
    assert run('{{eq .S "a" "b"}} {{ne 1 2}} {{lt 1 2}} {{ge "b" "a"}}', {"S": "b"}) == (
        "true true true true"
    )
    with pytest.raises(TemplateError, match="incompatible types for comparison"):
        run('{{eq 1 "1"}}')


def test_len_index_slice() -> None:
    data = {"L": ["a", "b", "c"], "S": "hello"}
    assert run("{{len .L}} {{index .L 1}} {{slice .L 1 3}} {{slice .S 1 3}}", data) == (
        "3 b [b c] el"
    )
    with pytest.raises(TemplateError, match="index out of range: 5"):
        run("{{index .L 5}}", data)


def test_print_printf_println() -> None:
    assert run('{{print "a" 1 2 "b"}}') == "a1 2b"  # spaces only between non-strings
    assert run('{{println "a" 1}}') == "a 1\n"
    assert run('{{printf "%-5s|%5s|%q|%v|%x|%t|%%" "ab" "cd" "q" 3 255 true}}') == (
        'ab   |   cd|"q"|3|ff|true|%'
    )
    assert run('{{printf "%d" "x"}} {{printf "%s"}} {{printf "" 1}}') == (
        "%!d(string=x) %!s(MISSING) %!(EXTRA int=1)"
    )


def test_html_js_urlquery() -> None:
    assert run("{{html \"<a href='x'>&</a>\"}}") == "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
    assert run('{{urlquery "a b&c"}}') == "a+b%26c"
    assert run('{{js "it\'s"}}') == "it\\'s"


def test_literals() -> None:
    assert run("{{\"tab\\there\"}}|{{`raw\\t`}}|{{'a'}}|{{0x10}}|{{1.5}}|{{-3}}|{{true}}") == (
        "tab\there|raw\\t|97|16|1.5|-3|true"
    )


def test_comments_and_trim_markers() -> None:
    assert run("a {{/* a comment */}} b") == "a  b"
    assert run("a  {{- /* gone */ -}}  b") == "ab"
    assert run("x \n {{- .A -}} \n y", {"A": 1}) == "x1y"
    assert run("{{.A -}}\n\n{{.A}}", {"A": "z"}) == "zz"


def test_header_functions_pass_the_header_through() -> None:
    from layerfs.formatting.template import HEADER_FUNCTIONS

    template = Template.parse('{{upper .Repository}}\t{{join .Tags ","}}')
    header = template.with_functions(HEADER_FUNCTIONS).execute({"Repository": "REPO", "Tags": "T"})
    assert header == "REPO\tT"


# -- errors: one line, with line and column -----------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{.Repository", "template: :1:0: unclosed action"),
        ("{{foo .Repository}}", 'template: :1:2: function "foo" not defined'),
        ("{{end}}", "template: :1:2: unexpected {{end}}"),
        ("{{if .A}}x", "unexpected EOF"),
        ("{{$nope}}", 'undefined variable "$nope"'),
        ("{{.A | }}", "missing command after |"),
        ("{{break}}", "{{break}} outside {{range}}"),
        ('{{"unterminated}}', "unterminated quoted string"),
        ("line one\n{{.A)}}", "template: :2:4: unexpected right paren"),
        ('{{define "x"}}{{end}}', "sub-templates are not supported"),
    ],
)
def test_parse_errors(template: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        Template.parse(template)
    text = str(info.value)
    assert text.startswith("template parsing error: template: :")
    assert message in text and "\n" not in text


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{.Foo}}", 'template: :1:2: executing "" at <.Foo>: can\'t evaluate field Foo in type t'),
        ("{{.A.Foo}}", 'template: :1:4: executing "" at <.A.Foo>: map has no entry'),
        ('{{join .A ","}}', "error calling join: wrong type for value; expected []string"),
        ("{{join .L}}", "wrong number of args for join: want 2 got 1"),
        ("{{range .S}}{{end}}", "range can't iterate over text"),
        ('{{.S "arg"}}', "S has arguments but cannot be invoked as function"),
        ("{{lt true false}}", "invalid type for comparison"),
    ],
)
def test_execution_errors(template: str, message: str) -> None:
    data = GoStruct({"A": GoStruct({}), "L": ["x"], "S": "text"}, type_name="t")
    with pytest.raises(TemplateError) as info:
        run(template, data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_template_of_fields_only_renders_as_the_general_way_does() -> None:
    """Text and {{.Field}} take a short way (listings); same output, same errors."""
    row = GoStruct({"ID": "abc", "Size": 12, "Flag": True, "Gone": None}, type_name="t")
    flat = Template.parse("{{.ID}}\t{{.Size}} {{.Flag}}/{{.Gone}}!")
    assert flat._flat is not None
    general = Template.parse("{{.ID}}\t{{.Size}} {{.Flag}}/{{.Gone}}{{if true}}!{{end}}")
    assert general._flat is None
    assert flat.execute(row) == general.execute(row) == "abc\t12 true/<nil>!"
    with pytest.raises(TemplateError, match="can't evaluate field Nope in type t"):
        Template.parse("{{.ID}} {{.Nope}}").execute(row)
