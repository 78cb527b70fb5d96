"""Tests for layerfs.model.changes: Dockerfile-style --change instructions."""

from __future__ import annotations

from typing import Any

import pytest

from layerfs.errors import UsageError
from layerfs.model.changes import SUPPORTED, apply_change, apply_changes


def changed(*changes: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    return apply_changes(config or {}, list(changes))


def test_supported_instructions() -> None:
    assert set(SUPPORTED) == {
        "CMD",
        "ENTRYPOINT",
        "ENV",
        "WORKDIR",
        "USER",
        "LABEL",
        "EXPOSE",
        "VOLUME",
        "STOPSIGNAL",
    }


# -- CMD / ENTRYPOINT -------------------------------------------------------------------------


@pytest.mark.parametrize(("instruction", "key"), [("CMD", "Cmd"), ("ENTRYPOINT", "Entrypoint")])
def test_exec_form(instruction: str, key: str) -> None:
    assert changed(f'{instruction} ["/bin/echo", "hello world"]') == {
        key: ["/bin/echo", "hello world"]
    }


@pytest.mark.parametrize(("instruction", "key"), [("CMD", "Cmd"), ("ENTRYPOINT", "Entrypoint")])
def test_shell_form(instruction: str, key: str) -> None:
    assert changed(f"{instruction} echo $HOME && ls") == {
        key: ["/bin/sh", "-c", "echo $HOME && ls"]
    }


@pytest.mark.parametrize(
    "value",
    ['["a", 1]', '["unterminated"', "[not json]", '["a"] trailing'],
)
def test_a_bracket_that_is_not_a_json_string_array_is_shell_form(value: str) -> None:
    assert changed(f"CMD {value}") == {"Cmd": ["/bin/sh", "-c", value]}


def test_empty_exec_form() -> None:
    assert changed("CMD []") == {"Cmd": []}


def test_instruction_names_are_case_insensitive_and_spaces_trimmed() -> None:
    assert changed('  cmd   ["sh"]  ') == {"Cmd": ["sh"]}
    assert changed("Workdir /srv") == {"WorkingDir": "/srv"}


def test_cmd_replaces_the_previous_one() -> None:
    assert changed("CMD a", 'CMD ["b"]', config={"Cmd": ["old"]}) == {"Cmd": ["b"]}


# -- simple values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("WORKDIR /app/src", {"WorkingDir": "/app/src"}),
        ("USER nobody:nogroup", {"User": "nobody:nogroup"}),
        ("USER 1000", {"User": "1000"}),
        ("STOPSIGNAL SIGTERM", {"StopSignal": "SIGTERM"}),
        ("STOPSIGNAL 9", {"StopSignal": "9"}),
    ],
)
def test_simple_values(change: str, expected: dict[str, Any]) -> None:
    assert changed(change) == expected


# -- ENV --------------------------------------------------------------------------------------


def test_env_key_value_pairs() -> None:
    assert changed('ENV A=1 B="two words" C=') == {"Env": ["A=1", "B=two words", "C="]}


def test_env_legacy_form_takes_the_rest_of_the_line() -> None:
    assert changed("ENV GREETING hello   big world") == {"Env": ["GREETING=hello   big world"]}


def test_env_replaces_an_existing_variable_and_keeps_the_others() -> None:
    config = {"Env": ["PATH=/usr/bin", "A=old", "B=b"]}
    assert changed("ENV A=new", config=config)["Env"] == ["PATH=/usr/bin", "B=b", "A=new"]
    assert config["Env"] == ["PATH=/usr/bin", "A=old", "B=b"]  # the input is not modified


def test_env_on_a_config_with_a_null_env() -> None:
    assert changed("ENV A=1", config={"Env": None}) == {"Env": ["A=1"]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("ENV LONELY", "ENV needs a value"),
        ("ENV =value", "expected KEY=VALUE"),
        ('ENV A="unterminated', "invalid --change ENV"),
    ],
)
def test_env_errors(change: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        changed(change)


# -- LABEL ------------------------------------------------------------------------------------


def test_labels_are_merged() -> None:
    config = {"Labels": {"keep": "1", "a": "old"}}
    result = changed('LABEL a=new "b c"="d e"', "LABEL version=2", config=config)
    assert result["Labels"] == {"keep": "1", "a": "new", "b c": "d e", "version": "2"}
    assert config["Labels"] == {"keep": "1", "a": "old"}


def test_label_on_a_config_with_null_labels() -> None:
    assert changed("LABEL a=b", config={"Labels": None}) == {"Labels": {"a": "b"}}


@pytest.mark.parametrize("change", ["LABEL novalue", "LABEL =x", "LABEL a=b c"])
def test_label_errors(change: str) -> None:
    with pytest.raises(UsageError, match=r"invalid --change LABEL .*expected KEY=VALUE"):
        changed(change)


# -- EXPOSE -----------------------------------------------------------------------------------


def test_expose_ports_and_protocols() -> None:
    config = {"ExposedPorts": {"22/tcp": {}}}
    assert changed("EXPOSE 80 53/udp 9/sctp 443/tcp", config=config)["ExposedPorts"] == {
        "22/tcp": {},
        "80/tcp": {},
        "53/udp": {},
        "9/sctp": {},
        "443/tcp": {},
    }


@pytest.mark.parametrize("port", ["0", "65536", "http", "80/icmp", "-1", "8080-8081", "/tcp"])
def test_expose_errors(port: str) -> None:
    with pytest.raises(UsageError, match=f"invalid --change EXPOSE port '{port}'"):
        changed(f"EXPOSE {port}")


def test_expose_boundaries() -> None:
    assert changed("EXPOSE 1 65535")["ExposedPorts"] == {"1/tcp": {}, "65535/tcp": {}}


# -- VOLUME -----------------------------------------------------------------------------------


def test_volume_json_and_plain_forms() -> None:
    assert changed('VOLUME ["/data", "/var/log"]') == {"Volumes": {"/data": {}, "/var/log": {}}}
    assert changed("VOLUME /a /b", config={"Volumes": {"/old": {}}}) == {
        "Volumes": {"/old": {}, "/a": {}, "/b": {}}
    }


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change", ["FROM scratch", "RUN make", "ADD . /", "COPY a b", "HEALTHCHECK"]
)
def test_unsupported_instructions(change: str) -> None:
    with pytest.raises(UsageError, match=r"unsupported --change instruction .* use one of CMD"):
        changed(change)


def test_empty_change() -> None:
    with pytest.raises(UsageError, match="unsupported --change instruction"):
        changed("   ")


@pytest.mark.parametrize("instruction", sorted(SUPPORTED))
def test_every_instruction_needs_an_argument(instruction: str) -> None:
    with pytest.raises(UsageError, match=f"--change {instruction} needs an argument"):
        changed(f"{instruction}   ")


def test_apply_change_works_in_place_and_apply_changes_on_a_copy() -> None:
    config: dict[str, Any] = {"User": "root"}
    result = apply_changes(config, ["USER nobody", "WORKDIR /"])
    assert config == {"User": "root"}
    assert result == {"User": "nobody", "WorkingDir": "/"}
    apply_change(config, "USER daemon")
    assert config == {"User": "daemon"}


def test_a_failing_change_list_leaves_the_input_alone() -> None:
    config: dict[str, Any] = {"Env": ["A=1"]}
    with pytest.raises(UsageError):
        apply_changes(config, ["ENV B=2", "EXPOSE nope"])
    assert config == {"Env": ["A=1"]}
