"""The scheduler role: leases workers through the allocation market and runs a job on them.

:mod:`hypha.scheduler.allocator` chooses among offers; :mod:`hypha.scheduler.node` advertises,
accepts, dispatches, renews and replaces; :mod:`hypha.scheduler.config` is its config schema.
"""
