"""The test suite's own rule: a missing prerequisite skips for a developer and fails in CI."""

from __future__ import annotations

import pytest

from . import conftest


def test_require_skips_with_the_reason_outside_ci(monkeypatch):
    monkeypatch.setattr(conftest, "CI", False)
    conftest.require(True, "unused")  # present: nothing happens
    with pytest.raises(pytest.skip.Exception, match="no Docker engine"):
        conftest.require(False, "no Docker engine")


def test_require_fails_with_the_reason_under_ci(monkeypatch):
    monkeypatch.setattr(conftest, "CI", True)
    conftest.require("/usr/bin/chromium", "unused")
    with pytest.raises(pytest.fail.Exception, match="chromium not installed .*CI=true"):
        conftest.require(None, "chromium not installed")


def test_ci_entry_point_sets_ci():
    lines = (conftest.REPO / ".ci" / "run").read_text().splitlines()
    assert "export CI=true" in lines and lines.index("export CI=true") < lines.index("make test")
