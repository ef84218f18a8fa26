"""The scheduler role: leases workers through the allocation market and runs a job on them.

:mod:`hypha.scheduler.allocator` chooses among offers; :mod:`hypha.scheduler.node` advertises,
accepts, dispatches, renews and replaces, and runs a DiLoCo job's parameter server and training
workers; :mod:`hypha.scheduler.sync` decides how many batches each training worker runs per
outer round (performance-aware synchronisation); :mod:`hypha.scheduler.config` is its config
schema.
"""
