"""``/hypha/round-plan/1``: parameter server → scheduler, whom to wait for in an outer round.

The parameter-server job of a DiLoCo run asks its scheduler, before and during each outer round,
which training workers take part (:class:`RoundPlanRequest`). The scheduler answers
:class:`RoundPlan`: the peers whose pseudo-gradients to wait for in ``round``, and ``timeout``,
the seconds to wait, counted from the first contribution that completes, before averaging what
has arrived. Only the worker running the scheduler's parameter-server job may ask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from hypha.messages._codec import MaxItems, Message, Range
from hypha.messages._common import Id, PeerId
from hypha.net import Protocol

__all__ = ["ROUND_PLAN", "RoundPlan", "RoundPlanRequest"]


class RoundPlanRequest(Message):
    """Parameter-server job ``job_id`` is at outer round ``round``: whom should it expect?"""

    job_id: Id
    round: Annotated[int, Range(ge=0)]


class RoundPlan(Message):
    """In outer round ``round`` wait for ``workers`` (training workers, by peer id), at most
    ``timeout`` seconds after the first complete contribution."""

    round: Annotated[int, Range(ge=0)]
    workers: Annotated[Sequence[PeerId], MaxItems(4096)]
    timeout: Annotated[float, Range(gt=0, le=86400)]

    def _validate(self) -> None:
        if len(set(self.workers)) != len(self.workers):
            raise self._error("workers", "lists a peer twice; allowed: distinct peer ids")


ROUND_PLAN = Protocol("round-plan", "1", max_request=RoundPlanRequest.MAX_SIZE,
                      max_response=RoundPlan.MAX_SIZE)
