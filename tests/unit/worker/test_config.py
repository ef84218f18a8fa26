"""The worker's config schema: defaults, round trip through render(), --gpu, validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hypha import worker
from hypha.config import ConfigError, add_arguments, load, overrides_from_args, render
from hypha.worker.arbiter import Pricing
from hypha.worker.config import (
    ExecutorSection,
    JobsSection,
    PricingSection,
    ResourcesSection,
    WorkerConfig,
    WorkerNetworkSection,
)

TLS = {"tls.cert": "/c.pem", "tls.key": "/k.pem", "tls.trust": "/t.pem"}
TLS_ENV = {"HYPHA_TLS_CERT": "/c.pem", "HYPHA_TLS_KEY": "/k.pem", "HYPHA_TLS_TRUST": "/t.pem"}
GATEWAY = "/ip4/203.0.113.7/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def worker_config(**overrides: object) -> WorkerConfig:
    return load(WorkerConfig, None, env={}, overrides={**TLS, **overrides})


def problem(**overrides: object) -> str:
    with pytest.raises(ConfigError) as exc:
        worker_config(**overrides)
    return str(exc.value)


def test_exports() -> None:
    assert sorted(worker.__all__) == [
        "Arbiter",
        "ExecutorSection",
        "Hold",
        "JobsSection",
        "Pricing",
        "PricingSection",
        "ResourcesSection",
        "STRATEGIES",
        "WorkerConfig",
        "WorkerNetworkSection",
        "apply_overrides",
        "batches",
        "detect",
        "format_size",
        "parse_size",
    ]
    for name in worker.__all__:
        assert getattr(worker, name) is not None


def test_defaults() -> None:
    cfg = worker_config()
    assert WorkerConfig.role == "worker"
    assert cfg.network == WorkerNetworkSection()
    assert cfg.network.listen == ["/ip4/0.0.0.0/tcp/0"] and cfg.network.bootstrap == []
    assert cfg.resources == ResourcesSection(cpu=None, memory=None, storage=None, gpu=None)
    assert cfg.executor == ExecutorSection(
        name="train", runtime="python", command=[]
    )
    assert cfg.pricing == PricingSection(strategy="flexible", price=1.0, floor=0.5)
    assert cfg.pricing.to_pricing() == Pricing("flexible", 1.0, 0.5)
    assert cfg.jobs == JobsSection(
        work_dir=Path("hypha-work"), keep_work_dirs=False, offer_ttl=5.0, batch_window=0.2
    )


def test_rendered_defaults_load_back(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(render(WorkerConfig), encoding="utf-8")
    assert load(WorkerConfig, path, env=TLS_ENV) == worker_config()


def test_rendered_values_load_back(tmp_path: Path) -> None:
    cfg = worker_config(
        **{
            "network.bootstrap": [GATEWAY],
            "resources.cpu": "6.5",
            "resources.memory": "16GiB",
            "resources.storage": "500G",
            "resources.gpu": "1",
            "executor.name": "diloco",
            "executor.runtime": "torch-2.4",
            "executor.command": ["python", "train.py", "--socket={SOCKET_PATH}", '{"a": 1}'],
            "pricing.strategy": "whole",
            "pricing.price": "2.5",
            "pricing.floor": "0",
            "jobs.work_dir": "/srv/hypha",
            "jobs.keep_work_dirs": "true",
            "jobs.offer_ttl": "2",
            "jobs.batch_window": "0",
        }
    )
    assert cfg.resources.memory_bytes() == 16 * 2**30
    assert cfg.resources.storage_bytes() == 500 * 10**9
    path = tmp_path / "worker.toml"
    path.write_text(render(WorkerConfig, cfg), encoding="utf-8")
    assert load(WorkerConfig, path, env={}) == cfg


def test_gpu_flag_sets_the_device_index() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, WorkerConfig)
    for argv in (["--gpu", "0"], ["--resources-gpu", "0"]):
        overrides = overrides_from_args(parser.parse_args(argv), WorkerConfig)
        assert overrides == {"resources.gpu": "0"}
        assert worker_config(**overrides).resources.gpu == 0
    assert worker_config().resources.gpu is None
    cfg = load(WorkerConfig, None, env={**TLS_ENV, "HYPHA_RESOURCES_GPU": "3"})
    assert cfg.resources.gpu == 3
    assert "--gpu INDEX" in parser.format_help()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("resources.cpu", "0", "resources.cpu: must be a positive number of cores, got 0.0"),
        ("resources.cpu", "nan", "resources.cpu: must be a positive number of cores"),
        ("resources.memory", "16 parsecs", "resources.memory: unknown unit 'parsecs'"),
        ("resources.memory", "0GiB", "resources.memory: must be more than 0 bytes"),
        ("resources.storage", "-1G", "resources.storage: a size cannot be negative"),
        ("resources.gpu", "-1", "resources.gpu: must be a CUDA device index (0, 1, ...), got -1"),
        ("resources.gpu", "first", "resources.gpu: expected an integer, got 'first'"),
        (
            "executor.name",
            "my job",
            "executor.name: got 'my job'; allowed: a string of 1-64 characters matching "
            "[a-z0-9._-]",
        ),
        ("executor.runtime", "", "executor.runtime: got ''; allowed: a string of 1-64 characters"),
        (
            "executor.command",
            ["run", "--dir={WORKDIR}"],
            "executor.command[1]: unknown placeholder {WORKDIR} in '--dir={WORKDIR}'; known: "
            "{SOCKET_PATH}, {WORK_DIR}, {JOB_JSON}",
        ),
        ("executor.command", [" ", "x"], "executor.command[0]: the program to run is empty"),
        ("executor.env", ["THROTTLE"], "executor.env[0]: expected KEY=VALUE with KEY a variable "
         "name, got 'THROTTLE'"),
        ("executor.env", ["A=1", "1X=2"], "executor.env[1]: expected KEY=VALUE"),
        ("executor.env", ["=2"], "executor.env[0]: expected KEY=VALUE"),
        ("executor.parameter_server_name", "Big PS", "executor.parameter_server_name: got "
         "'Big PS'; allowed: a string of 1-64 characters"),
        (
            "pricing.strategy",
            "hole",
            "pricing.strategy: expected one of flexible, whole, got 'hole' (did you mean whole?)",
        ),
        ("pricing.price", "0", "pricing.price: must be a positive price per hour, got 0.0"),
        ("pricing.price", "inf", "pricing.price: must be a positive price per hour"),
        ("pricing.floor", "-1", "pricing.floor: must be 0 or a positive price per hour, got -1.0"),
        ("pricing.floor", "nan", "pricing.floor: must be 0 or a positive price per hour"),
        ("jobs.offer_ttl", "0", "jobs.offer_ttl: must be a positive number of seconds, got 0.0"),
        ("jobs.batch_window", "-0.1", "jobs.batch_window: must be 0 (answer each at once)"),
    ],
)
def test_invalid_settings(key: str, value: object, message: str) -> None:
    assert message in problem(**{key: value})


def test_offered_executors_and_job_env() -> None:
    from hypha.messages import Executor

    cfg = worker_config(**{"executor.command": ["python", "train.py"],
                           "executor.parameter_server": "true",
                           "executor.env": ["HYPHA_THROTTLE=3", "A=b=c"]})
    assert cfg.executor.offered() == [
        Executor(kind="process", name="train", runtime="python"),
        Executor(kind="parameter-server", name="diloco", runtime="python")]
    assert cfg.executor.job_env() == {"HYPHA_THROTTLE": "3", "A": "b=c"}
    # a parameter server alone needs no command
    alone = worker_config(**{"executor.parameter_server": "true"})
    assert [e.kind for e in alone.executor.offered()] == ["parameter-server"]
    assert worker_config().executor.offered() == []


def test_a_floor_above_the_price_is_allowed() -> None:
    # NOTE: the floor is the least acceptable price, the price what is asked; a whole-strategy
    # worker with floor > price then never undercuts the floor even when bids are low.
    assert worker_config(**{"pricing.floor": "5"}).pricing.floor == 5.0
