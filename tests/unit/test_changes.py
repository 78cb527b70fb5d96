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
        "ONBUILD",
        "HEALTHCHECK",
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
    "change", ["FROM scratch", "RUN make", "ADD . /", "COPY a b", "MAINTAINER me"]
)
def test_unsupported_instructions(change: str) -> None:
    with pytest.raises(UsageError, match=r"unsupported --change instruction .* use one of CMD"):
        changed(change)


# -- ONBUILD / HEALTHCHECK --------------------------------------------------------------------


def test_onbuild_appends_the_trigger_as_written() -> None:
    config = changed("ONBUILD RUN make", "onbuild copy . /app", config={"OnBuild": ["ADD x /"]})
    assert config == {"OnBuild": ["ADD x /", "RUN make", "copy . /app"]}


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ("ONBUILD RUN x", "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"),
        ("FROM scratch", "FROM isn't allowed as an ONBUILD trigger"),
        ("maintainer me", "MAINTAINER isn't allowed as an ONBUILD trigger"),
    ],
)
def test_onbuild_refuses_what_docker_refuses(trigger: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        changed(f"ONBUILD {trigger}")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # Docker's builder: shell form is CMD-SHELL, exec form CMD, durations in ns.
        (
            "HEALTHCHECK CMD curl -f http://localhost/ || exit 1",
            {"Test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"]},
        ),
        ('HEALTHCHECK CMD ["/bin/check", "--deep"]', {"Test": ["CMD", "/bin/check", "--deep"]}),
        ('healthcheck cmd ["/bin/sh", "-c", "x"]', {"Test": ["CMD", "/bin/sh", "-c", "x"]}),
        ("HEALTHCHECK NONE", {"Test": ["NONE"]}),
        (
            "HEALTHCHECK --interval=1m30s --timeout=500ms --start-period=2s --start-interval=1.5s"
            " --retries=3 CMD true",
            {
                "Test": ["CMD-SHELL", "true"],
                "Interval": 90_000_000_000,
                "Timeout": 500_000_000,
                "StartPeriod": 2_000_000_000,
                "StartInterval": 1_500_000_000,
                "Retries": 3,
            },
        ),
        ("HEALTHCHECK --interval=0s --retries=0 CMD true", {"Test": ["CMD-SHELL", "true"]}),
    ],
)
def test_healthcheck(change: str, expected: dict[str, Any]) -> None:
    assert changed(change) == {"Healthcheck": expected}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("HEALTHCHECK CMD", "Missing command after HEALTHCHECK CMD"),
        ("HEALTHCHECK RUN x", "Unknown type 'RUN' in HEALTHCHECK \\(try CMD\\)"),
        ("HEALTHCHECK NONE extra", "HEALTHCHECK NONE takes no arguments"),
        ("HEALTHCHECK --interval=999us CMD x", "cannot be less than 1ms"),
        ("HEALTHCHECK --interval=soon CMD x", "not a duration"),
        ("HEALTHCHECK --retries=-2 CMD x", "--retries cannot be negative \\(-2\\)"),
        ("HEALTHCHECK --retries=x CMD x", "not a number"),
        ("HEALTHCHECK --timeout CMD x", "missing a value on flag --timeout"),
        ("HEALTHCHECK --every=1s CMD x", "unknown flag"),
    ],
)
def test_bad_healthchecks(change: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
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
