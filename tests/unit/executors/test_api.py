"""hypha.executors' public surface."""

from __future__ import annotations

import hypha.executors


def test_exports() -> None:
    modules = {"bridge", "client", "local", "network", "parameter_server", "process", "train",
               "workspace"}
    assert sorted(hypha.executors.__all__) == sorted(
        name for name in dir(hypha.executors) if not name.startswith("_") and name not in modules)
    for name in hypha.executors.__all__:
        assert getattr(hypha.executors, name) is not None
