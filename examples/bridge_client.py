"""The job bridge client for the examples and test scripts of this repository.

The implementation is ``hypha/executors/client.py``: one file, Python's standard library only.
A training project that does not install Hypha copies that file (as ``bridge_client.py``) and
imports the same names; where Hypha is installed, this module re-exports them::

    from bridge_client import BridgeClient, BridgeError

    bridge = BridgeClient()                     # the socket in $HYPHA_SOCKET_PATH
    bridge.fetch("data/slice-0.safetensors", source="data", dataset="fineweb")
    answer = bridge.report(step, {"loss": 2.31})   # {"round", "batches", "parameter_server"}
"""

from __future__ import annotations

import json

from hypha.executors.client import BridgeClient, BridgeError, EventStream

__all__ = ["BridgeClient", "BridgeError", "EventStream"]

if __name__ == "__main__":
    print(json.dumps(BridgeClient().health()))
