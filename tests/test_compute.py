"""compute.threads: torch's intra-op threads, chosen per host (auto) or fixed, applied by every entry point."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from pipeline import config
from pipeline.config import ParamsError, apply_threads, load_params


@pytest.fixture(autouse=True)
def restore_threads():
    """Every test leaves torch's thread count as it found it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def host(monkeypatch, cores: int | None, load: float | None) -> None:
    """Pretend the host has `cores` CPU cores and this 1-minute load average (None: not available)."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)

    def getloadavg():
        if load is None:
            raise OSError("no load average on this platform")
        return (load, load, load)

    monkeypatch.setattr(os, "getloadavg", getloadavg)


def params(threads) -> config.Params:
    return load_params("/nonexistent", overrides={"compute.threads": threads})


@pytest.mark.parametrize(("cores", "load", "expected"), [
    (2, 0.0, 1),          # a 2-core host: one thread whatever the load
    (1, 0.0, 1),
    (None, 0.0, 1),       # cpu_count unknown: count it as one core
    (8, 8.0, 1),          # a loaded host: 1-minute load >= its cores
    (8, 12.5, 1),
    (8, 7.9, None),       # a free host: torch's default
    (8, None, None),      # no load average: judged by the cores alone
])
def test_auto_resolves_from_cores_and_load(monkeypatch, cores, load, expected):
    host(monkeypatch, cores, load)
    assert config.auto_threads() == expected, f"{cores} cores, load {load}"


def test_auto_sets_one_thread_on_a_small_or_loaded_host_and_torch_default_on_a_free_one(monkeypatch):
    torch.set_num_threads(3)   # torch's default in this process, as far as apply_threads knows
    monkeypatch.setattr(config, "_torch_default_threads", None)
    host(monkeypatch, 2, 0.1)
    assert apply_threads(params("auto")) == 1 and torch.get_num_threads() == 1, "2 cores: one thread"
    host(monkeypatch, 16, 20.0)
    assert apply_threads(params("auto")) == 1, "a loaded host: one thread"
    host(monkeypatch, 16, 0.5)
    assert apply_threads(params("auto")) == 3 == torch.get_num_threads(), \
        "a free host gets torch's own default back (read before the first change)"


def test_a_number_is_applied_and_logged_once(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="pipeline.config")
    monkeypatch.setattr(config, "_logged_threads", None)
    assert apply_threads(params(3)) == 3 and torch.get_num_threads() == 3, "threads: 3 is applied"
    assert apply_threads(params(3)) == 3
    lines = [r.getMessage() for r in caplog.records if "intra-op threads" in r.getMessage()]
    assert lines == ["torch intra-op threads: 3 (compute.threads: 3; " + f"{os.cpu_count()} CPU cores)"], lines


def test_the_default_is_auto_and_not_part_of_the_params_hash():
    default = load_params("/nonexistent")
    assert default.compute.threads == "auto", "default: auto"
    assert config.params_hash(default) == config.params_hash(params(4)), "threads change speed, not the model"


@pytest.mark.parametrize("bad", [0, -2, "many", 1.5, True])
def test_a_bad_value_fails_at_load_time_naming_the_key(tmp_path, bad):
    path = tmp_path / "params.yaml"
    path.write_text(f"compute:\n  threads: {bad!r}\n".replace("'", ""))
    with pytest.raises(ParamsError, match=r"compute\.threads"):
        load_params(path)


def test_stage_main_applies_threads_before_the_stage_runs(tmp_path):
    from pipeline.stages.common import stage_main

    path = tmp_path / "params.yaml"
    path.write_text("compute:\n  threads: 1\n")
    torch.set_num_threads(2)
    seen = {}
    assert stage_main("probe", lambda p: seen.update(threads=torch.get_num_threads()) or {}, ["--params", str(path)]) == 0
    assert seen["threads"] == 1, "a DVC stage runs with compute.threads"


def test_cli_applies_threads_before_a_model_command_and_not_for_registry_commands(tmp_path, monkeypatch):
    from pipeline.apps import cli

    path = tmp_path / "params.yaml"
    path.write_text("compute:\n  threads: 1\n")
    seen = {}
    monkeypatch.setattr(cli, "_cmd_twins", lambda args, params: seen.update(twins=torch.get_num_threads()) or 0)
    monkeypatch.setattr(cli, "_cmd_models", lambda args, params: seen.update(models=torch.get_num_threads()) or 0)
    torch.set_num_threads(2)
    assert cli.main(["--params", str(path), "models"]) == 0
    assert cli.main(["--params", str(path), "twins"]) == 0
    assert seen == {"models": 2, "twins": 1}, f"threads seen by each command: {seen}"


def test_cli_refuses_a_bad_threads_value(tmp_path, caplog):
    from pipeline.apps.cli import main

    path = tmp_path / "params.yaml"
    path.write_text("compute:\n  threads: many\n")
    assert main(["--params", str(path), "models"]) == 2
    assert "compute.threads" in caplog.text


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f avx512bw", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_tile amx_bf16", True), ("fpu avx512_bf16x", False)])
def test_bf16_training_only_where_a_cpu_has_native_bf16(tmp_path, flags, native):
    from pipeline.core.scoring import native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert native_bf16(torch.device("cpu"), cpuinfo) is native, flags
    assert native_bf16(torch.device("cpu"), tmp_path / "missing") is False, "no cpuinfo: float32"
    assert native_bf16(torch.device("cuda")) is True


@pytest.mark.parametrize(("cores", "processes", "bootstrap", "others"), [
    (2, 1, 2, 1),    # a 2-core host: two batch makers for bootstrap, one worker for fine-tuning and twins
    (2, 2, 0, 0),    # two training processes on 2 cores: none
    (8, 2, 2, 1),
    (1, 1, 0, 0),
])
def test_auto_batch_workers_follow_the_cores_per_training_process(monkeypatch, cores, processes, bootstrap, others):
    host(monkeypatch, cores, 0.0)
    p = load_params("/nonexistent")
    assert config.batch_workers(p, processes, auto=2) == bootstrap and config.batch_workers(p, processes) == others
    fixed = load_params("/nonexistent", overrides={"compute.batch_workers": 3})
    assert config.batch_workers(fixed, processes, auto=2) == 3, "a number is used as it is"
