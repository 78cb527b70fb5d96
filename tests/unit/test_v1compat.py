"""v1 IDs and JSON as Docker's Go code writes them (the integration tests compare with dockerd)."""

from __future__ import annotations

import hashlib
import json

import pytest

from layerfs.model.v1compat import (
    chain_ids,
    create_id,
    go_quote,
    go_time,
    v1_image_from_config,
    v1_layers,
)

ZERO_CONFIG = (
    '{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":false,'
    '"AttachStderr":false,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,'
    '"Cmd":null,"Image":"","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,'
    '"Labels":null}'
)
A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("plain", '"plain"'),
        ("<a&b>", '"\\u003ca\\u0026b\\u003e"'),
        ('q"\\', '"q\\"\\\\"'),
        ("\n\r\t\x01\x08", '"\\n\\r\\t\\u0001\\u0008"'),
        ("\u2028é\U0001f600", '"\\u2028é\U0001f600"'),
        ("\ud800", '"\\ufffd"'),
    ],
)
def test_go_quote(text: str, quoted: str) -> None:
    assert go_quote(text) == quoted


@pytest.mark.parametrize(
    ("value", "formatted"),
    [
        ("2024-01-02T03:04:05Z", "2024-01-02T03:04:05Z"),
        ("2024-01-02T03:04:05.120000000Z", "2024-01-02T03:04:05.12Z"),
        ("2024-01-02T03:04:05.000Z", "2024-01-02T03:04:05Z"),
        ("2024-01-02T03:04:05.1234567891Z", "2024-01-02T03:04:05.123456789Z"),
        ("2024-01-02T03:04:05+00:00", "2024-01-02T03:04:05Z"),
        ("2024-01-02T03:04:05.5+02:00", "2024-01-02T03:04:05.5+02:00"),
        ("yesterday", "0001-01-01T00:00:00Z"),
        ("2024-01-02T03:04:05Z\n", "0001-01-01T00:00:00Z"),
        (None, "0001-01-01T00:00:00Z"),
    ],
)
def test_go_time(value: object, formatted: str) -> None:
    assert go_time(value) == formatted


def test_chain_ids() -> None:
    second = "sha256:" + hashlib.sha256(f"{A} {B}".encode()).hexdigest()
    assert chain_ids([A, B]) == [A, second]
    assert chain_ids([]) == []


def test_a_lower_layer_stub_and_its_id() -> None:
    stub = v1_image_from_config({})
    stub["created"] = "1970-01-01T00:00:00Z"
    expected = (
        '{"container_config":' + ZERO_CONFIG + ',"created":"1970-01-01T00:00:00Z",'
        f'"layer_id":"{A}","parent":"sha256:{"c" * 64}"' + "}"
    )
    assert create_id(stub, A, "c" * 64) == hashlib.sha256(expected.encode()).hexdigest()


def test_the_top_layer_json_keeps_the_images_legacy_fields_in_go_order() -> None:
    config = {
        "os": "linux",
        "architecture": "amd64",
        "created": "2024-01-02T03:04:05.500Z",
        "author": "me",
        "parent": "sha256:" + "d" * 64,  # image.Image's own field: not the v1 parent
        "unknown": 1,
        "config": {
            "Cmd": "sh",  # a single string is a StrSlice of one
            "Env": [],
            "StopTimeout": 0,  # a pointer to 0 is kept
            "Healthcheck": {"Test": ["CMD", "true"], "Interval": 5000000000},
            "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
            "Labels": {"b": "2", "a": "1"},
            "Shell": [],
            "MacAddress": "",
            "hostname": "case-insensitive",
        },
        "rootfs": {"type": "layers", "diff_ids": [A, B]},
    }

    (base_id, base_json), (top_id, top_json) = v1_layers(config, [A, B])

    assert json.loads(base_json) == {
        "id": base_id,
        "created": "1970-01-01T00:00:00Z",
        "container_config": json.loads(ZERO_CONFIG),
        "os": "linux",
    }
    text = top_json.decode()
    assert text.startswith(
        f'{{"id":"{top_id}","parent":"{base_id}","created":"2024-01-02T03:04:05.5Z",'
        '"container_config":'
        + ZERO_CONFIG
        + ',"author":"me","config":{"Hostname":"case-insensitive",'
    )
    assert (
        '"ExposedPorts":{"53/udp":{},"80/tcp":{}},"Tty":false,"OpenStdin":false,'
        '"StdinOnce":false,"Env":[],"Cmd":["sh"],"Healthcheck":{"Test":["CMD","true"],'
        '"Interval":5000000000},"Image":""'
    ) in text
    assert text.endswith(
        '"OnBuild":null,"Labels":{"a":"1","b":"2"},"StopTimeout":0},"architecture":"amd64",'
        '"os":"linux"}'
    )
    assert "unknown" not in text and "Shell" not in text and "MacAddress" not in text
