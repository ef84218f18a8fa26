"""``/hypha/renew-lease/1``: scheduler → worker, keeping a lease alive.

The scheduler sends :class:`RenewLease` at about 75% of a lease's time; the worker extends it by
``ttl`` seconds from now and answers :class:`LeaseRenewed` with the new expiry, or rejects the
call (``RequestRejected``) when the lease is unknown or already expired. The first renewal of an
offer's temporary lease is how a scheduler accepts that offer; temporary leases that nobody
renews simply expire, freeing their resources. A lease that expires frees its resources and
stops its job, and the scheduler reschedules the work.
"""

from __future__ import annotations

from hypha.messages._codec import Message
from hypha.messages._common import Id, LeaseTTL, Timestamp
from hypha.net import Protocol

__all__ = ["RENEW_LEASE", "LeaseRenewed", "RenewLease"]


class RenewLease(Message):
    """Extend lease ``lease_id`` to ``ttl`` seconds from now."""

    lease_id: Id
    ttl: LeaseTTL


class LeaseRenewed(Message):
    """Lease ``lease_id`` now holds until ``expires`` (Unix seconds)."""

    lease_id: Id
    expires: Timestamp


RENEW_LEASE = Protocol("renew-lease", "1", max_request=RenewLease.MAX_SIZE,
                       max_response=LeaseRenewed.MAX_SIZE)
