"""The worker role: offers this machine's resources to schedulers and runs the jobs they dispatch.

A worker answers schedulers' advertisements on the ``hypha/worker`` topic with priced offers
(:mod:`hypha.worker.arbiter`), holds the offered resources under leases the schedulers renew, and
frees them when a lease runs out. What it offers is detected and capped by its config
(:mod:`hypha.worker.resources`, :mod:`hypha.worker.config`).
"""

from hypha.worker.arbiter import STRATEGIES, Arbiter, Hold, Pricing, batches
from hypha.worker.config import (
    ExecutorSection,
    JobsSection,
    PricingSection,
    ResourcesSection,
    WorkerConfig,
    WorkerNetworkSection,
)
from hypha.worker.resources import apply_overrides, detect, format_size, parse_size

__all__ = [
    "STRATEGIES",
    "Arbiter",
    "ExecutorSection",
    "Hold",
    "JobsSection",
    "Pricing",
    "PricingSection",
    "ResourcesSection",
    "WorkerConfig",
    "WorkerNetworkSection",
    "apply_overrides",
    "batches",
    "detect",
    "format_size",
    "parse_size",
]
