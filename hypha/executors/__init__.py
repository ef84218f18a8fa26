"""hypha.executors: how a worker runs jobs.

- :class:`ProcessExecutor` runs any training script as a child process (its own process group,
  stopped with SIGTERM then SIGKILL) in a :class:`JobWorkspace`, with a :class:`JobBridge`
  beside it.
- :class:`JobBridge` is the script's way to the worker: HTTP on a per-job 0600 Unix socket
  (``/health``, ``/resources/fetch``, ``/resources/send``, ``/resources/receive`` as
  Server-Sent Events), served by hypercorn on trio. Every path in a request is confined to the
  job's work directory (:class:`PathRefused`). It delegates the transfers to a
  :class:`BridgeBackend`: :class:`LocalBackend` (local files, and a :class:`Loopback` between
  bridges of one process) or the network.

``examples/bridge_client.py`` is a dependency-free client for scripts to copy.
"""

from hypha.executors._paths import AtomicFile, PathRefused
from hypha.executors.bridge import (
    MAX_BODY_BYTES,
    STRATEGIES,
    BridgeBackend,
    BridgeError,
    FetchRequest,
    IncomingFile,
    JobBridge,
    deliver,
    incoming_destination,
    read_chunks,
    write_chunks,
)
from hypha.executors.local import LocalBackend, Loopback
from hypha.executors.process import (
    DEFAULT_GRACE_PERIOD,
    JobStartError,
    JobState,
    JobStatus,
    ProcessExecutor,
    RunningJob,
    expand_command,
)
from hypha.executors.workspace import JobWorkspace, WorkspaceError

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "MAX_BODY_BYTES",
    "STRATEGIES",
    "AtomicFile",
    "BridgeBackend",
    "BridgeError",
    "FetchRequest",
    "IncomingFile",
    "JobBridge",
    "JobStartError",
    "JobState",
    "JobStatus",
    "JobWorkspace",
    "LocalBackend",
    "Loopback",
    "PathRefused",
    "ProcessExecutor",
    "RunningJob",
    "WorkspaceError",
    "deliver",
    "expand_command",
    "incoming_destination",
    "read_chunks",
    "write_chunks",
]
