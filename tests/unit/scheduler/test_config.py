"""The scheduler's [job] settings of a DiLoCo run: defaults, checks, what they build."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypha.config import ConfigError, load
from hypha.messages import GIB, Executor, Resources
from hypha.scheduler.config import SchedulerConfig

TLS = {"HYPHA_TLS_CERT": "c.pem", "HYPHA_TLS_KEY": "k.pem", "HYPHA_TLS_TRUST": "t.pem"}


def _load(**overrides: object) -> SchedulerConfig:
    return load(SchedulerConfig, None, env=TLS,
                overrides={f"job.{k}": v for k, v in overrides.items()})


def test_defaults() -> None:
    job = _load().job
    assert (job.parameter_server, job.ps_executor_name, job.ps_cpu, job.ps_memory,
            job.ps_storage) == (False, "diloco", 1.0, "1GiB", "1GiB")
    assert (job.rounds, job.sync_batches, job.perf_aware, job.round_timeout,
            job.metrics_log) == (10, 50, True, 60.0, None)


def test_the_parameter_server_requirements(tmp_path: Path) -> None:
    job = _load(parameter_server="true", ps_cpu="2", ps_memory="4GiB", ps_storage="10GiB",
                ps_executor_name="ps", executor_runtime="torch-2.5",
                metrics_log=str(tmp_path / "m.jsonl")).job
    assert job.ps_requirements() == Resources(cpu=2.0, memory=4 * GIB, storage=10 * GIB)
    assert job.ps_executor() == Executor(kind="parameter-server", name="ps",
                                         runtime="torch-2.5")
    assert job.metrics_log == tmp_path / "m.jsonl"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rounds": "0"}, "job.rounds: must be at least 1, got 0"),
    ({"sync_batches": "0"}, "job.sync_batches: must be between 1 and 4294967296, got 0"),
    ({"round_timeout": "0"}, r"job.round_timeout: must be a number of seconds in \(0, 86400\]"),
    ({"round_timeout": "100000"}, "job.round_timeout: must be a number of seconds"),
    ({"ps_cpu": "-1"}, "job.ps_cpu: must be a number of cores >= 0, got -1.0"),
    ({"ps_memory": "lots"}, "job.ps_memory: expected a size in bytes"),
    ({"ps_storage": "-1GiB"}, "job.ps_storage:"),
    ({"ps_executor_name": "Not Valid"}, "job.ps_executor_name: got 'Not Valid'"),
    ({"metrics_log": "/no/such/dir/m.jsonl"},
     "job.metrics_log: directory /no/such/dir does not exist; create it first"),
    ({"metrics_log": "/"}, "job.metrics_log: / is a directory"),
    ({"parameter_server": "true", "executor_kind": "parameter-server"},
     "job.executor_kind: the training workers of a parameter-server run need a 'process'"),
    ({"parameter_server": "true", "settings": ["lr=0.1", "rounds=3"]},
     r"job.settings\[1\]: 'rounds' is set by the scheduler in a parameter-server run"),
])
def test_bad_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(**overrides)


def test_reserved_keys_are_fine_without_a_parameter_server() -> None:
    assert _load(settings=["rounds=3"]).job.job_config() == {"rounds": "3"}
