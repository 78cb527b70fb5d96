"""An error keeps what caused it: one line for the user, and with --debug the causes too.

The message a user sees is the same with or without ``--debug``; ``--debug`` adds the
traceback and one ``caused by:`` line per cause, so that a bug report carries the clue
(the network error behind "cannot get a token", the OS error behind "cannot write").
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import requests

from layerfs.cli import causes_of, run
from layerfs.errors import RegistryError, UsageError
from layerfs.registry.auth import Authenticator, Challenge


def _failing_handler(args: argparse.Namespace) -> int:
    try:
        open("/nonexistent-dir/x", "wb")  # noqa: SIM115 - it fails
    except OSError as exc:
        raise UsageError(f"cannot write x: {exc.strerror}") from exc
    return 0


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_the_cause_and_the_message_stays_the_same(
    debug: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(_failing_handler, argparse.Namespace(debug=debug)) == 2
    err = capsys.readouterr().err
    assert "layerfs: error: cannot write x: No such file or directory\n" in err
    cause = "  caused by: FileNotFoundError: [Errno 2] No such file or directory: "
    assert (cause in err) is debug
    assert ("Traceback" in err) is debug


def test_the_chain_follows_causes_and_contexts_but_not_what_from_none_hides() -> None:
    try:
        try:
            try:
                raise KeyError("inner")
            except KeyError:
                raise ValueError("middle")  # noqa: B904 - the context is what is tested
        except ValueError as exc:
            raise UsageError("outer") from exc
    except UsageError as exc:
        assert [type(c) for c in causes_of(exc)] == [ValueError, KeyError]
    try:
        try:
            raise KeyError("hidden")
        except KeyError:
            raise UsageError("alone") from None
    except UsageError as exc:
        assert causes_of(exc) == []


def test_a_token_request_that_fails_keeps_the_network_error() -> None:
    def send(method: str, url: str, **kw: Any) -> requests.Response:
        raise requests.ConnectionError("connection refused by token.example:443")

    auth = Authenticator(requests.Session(), "reg.example", None, timeout=5, send=send)
    auth.challenge = Challenge("bearer", {"realm": "https://token.example/token"})
    with pytest.raises(RegistryError) as caught:
        auth.header(["repository:x:pull"])
    assert caught.value.message == (
        "cannot get a token from token.example for reg.example: ConnectionError"
    )
    assert isinstance(caught.value.__cause__, requests.ConnectionError)
    assert "connection refused by token.example:443" in str(caught.value.__cause__)
