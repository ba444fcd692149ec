"""The missing-requirement helper of conftest.py: skip locally, fail under CI=true."""

from __future__ import annotations

import sys

import pytest

from conftest import import_or_missing, missing_requirement, under_ci


@pytest.mark.parametrize(("value", "expected"), [
    (None, False), ("", False), ("false", False), ("0", False), ("true", True), ("TRUE", True), ("1", True)])
def test_under_ci_reads_the_ci_variable(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert under_ci() is expected


def test_missing_requirement_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="dataset X is not installed"):
        missing_requirement("dataset X is not installed")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        missing_requirement("dataset X is not installed")


def test_missing_requirement_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="dataset X is not installed.*CI=true"):
        missing_requirement("dataset X is not installed")


def test_import_or_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert import_or_missing("json", "never") is sys.modules["json"]  # present: the module, even under CI
    with pytest.raises(pytest.fail.Exception, match="pkg absent"):
        import_or_missing("cmkit_no_such_module", "pkg absent")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="pkg absent"):
        import_or_missing("cmkit_no_such_module", "pkg absent")


@pytest.mark.parametrize("ci", ["true", ""])
def test_module_level_requirement_fails_the_run_only_under_ci(pytester: pytest.Pytester,
                                                              monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    """As test_diffusers.py uses it: at import time of a test module, in a real (in-process) pytest run."""
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(
        test_needs_pkg="from conftest import import_or_missing\n"
                       "import_or_missing('cmkit_no_such_module', 'pkg absent')\n"
                       "def test_x():\n    pass\n",
        test_other="def test_y():\n    pass\n")
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-rs")
    assert "pkg absent" in result.stdout.str()
    if ci:
        assert result.ret != 0 and result.parseoutcomes().get("skipped") is None, result.stdout.str()
    else:
        assert result.ret == 0 and result.parseoutcomes() == {"passed": 1, "skipped": 1}, result.stdout.str()
