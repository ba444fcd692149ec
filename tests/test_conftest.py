"""The missing-requirement helper of conftest.py: skip locally, fail under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import import_or_missing, missing_requirement, under_ci

TESTS = Path(__file__).resolve().parent


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
def test_module_level_requirement_fails_the_run_only_under_ci(tmp_path: Path, ci: str) -> None:
    """As test_diffusers.py uses it: at import time of a test module, in a real pytest run."""
    (tmp_path / "test_needs_pkg.py").write_text(
        "from conftest import import_or_missing\n"
        "import_or_missing('cmkit_no_such_module', 'pkg absent')\n"
        "def test_x():\n    pass\n")
    (tmp_path / "test_other.py").write_text("def test_y():\n    pass\n")
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "CI": ci, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "pkg absent" in out.stdout
    if ci:
        assert out.returncode != 0 and "skipped" not in out.stdout, out.stdout
    else:
        assert out.returncode == 0 and "1 passed, 1 skipped" in out.stdout, out.stdout
