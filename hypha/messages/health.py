"""``/hypha/health/1``: any node → any node, is it up and what is it.

:class:`HealthCheck` carries nothing; the node answers :class:`Health` with its state, role,
software version and uptime; a launcher or a monitor can poll it to see that a node is ready.
"""

from __future__ import annotations

from typing import Annotated, Literal

from hypha.messages._codec import Message, Range, Text
from hypha.net import Protocol

__all__ = ["HEALTH", "Health", "HealthCheck", "HealthStatus", "Role"]

HealthStatus = Literal["ok", "degraded"]
Role = Literal["gateway", "scheduler", "worker", "data"]


class HealthCheck(Message):
    """Are you there?"""


class Health(Message):
    """A ``role`` node running Hypha ``version``, up for ``uptime`` seconds, is ``status``."""

    status: HealthStatus
    role: Role
    version: Annotated[str, Text(64, min_len=1)]
    uptime: Annotated[float, Range(ge=0)]


HEALTH = Protocol("health", "1", max_request=HealthCheck.MAX_SIZE, max_response=Health.MAX_SIZE)
