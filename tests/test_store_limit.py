"""flows.store_limit without a server: the limit is skipped, saying so, and the guarded block still runs.
(With a server it is tested for real in test_prefect_server.)"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows.store_limit import PREFIX, limit_name, one_retrain_per_store


def test_limit_name_is_per_store_path_and_a_valid_prefect_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = limit_name(Path("data/store")), limit_name(tmp_path / "other" / "store")
    assert a == limit_name(tmp_path / "data" / "store"), "a relative path names the same store as its absolute form"
    assert a != b and a.startswith(PREFIX) and b.startswith(PREFIX), f"one limit per store: {a} {b}"
    assert not set("/%&<>") & set(a), f"no character Prefect refuses in a name: {a}"


def test_without_a_server_the_limit_is_skipped_with_a_log_line(tmp_path, caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ran = []
    with temporary_settings(updates={PREFECT_API_URL: None}), caplog.at_level(logging.INFO):
        with one_retrain_per_store(tmp_path / "data" / "store", timeout_s=1) as held:
            ran.append(held)
    assert ran and ran[0]["limit"] is None and ran[0]["waited_s"] == 0, f"the block ran, unlimited: {ran}"
    assert any("store concurrency limit skipped" in r.getMessage() and str(tmp_path) in r.getMessage()
               for r in caplog.records), f"one log line says so: {[r.getMessage() for r in caplog.records]}"


def test_with_a_server_url_the_limit_is_not_silently_skipped(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # given a PREFECT_API_URL nobody answers: the limit must be taken (and fail), never skipped
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), pytest.raises(Exception) as err:
        with one_retrain_per_store(tmp_path / "store", timeout_s=1):
            pytest.fail("the block must not run when the limit could not be taken")
