"""Suite-wide hooks.

Under CI (the environment variable ``CI`` is set and not empty) everything the integration
tests need is installed, so a test under ``tests/integration`` that skips has really
failed: its report is turned into a failure reading ``skipped in CI: <reason>``. This
covers skips in setup (fixtures, ``skipif`` markers), in the test itself, and a module
that skips while being collected (``pytest.importorskip``). Outside CI skips stay skips.
``xfail`` is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

INTEGRATION_DIR = Path(__file__).parent / "integration"


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


def _is_integration(path: Path) -> bool:
    return Path(path).resolve().is_relative_to(INTEGRATION_DIR.resolve())


def _skip_reason(longrepr: Any) -> str:
    # A skip's longrepr is (path, lineno, "Skipped: <reason>").
    message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr
    return str(message).removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if (
        _in_ci()
        and report.when in ("setup", "call")
        and report.skipped
        and not hasattr(report, "wasxfail")
        and _is_integration(item.path)
    ):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI: {_skip_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if _in_ci() and report.skipped and _is_integration(collector.path):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI: {_skip_reason(report.longrepr)}"
