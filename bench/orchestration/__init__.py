"""Running grids: config, cells and cache keys, plans, schedulers, executors (local, Ray), the
artifact store, locks, job status and the cell runner. The layer above plugins and reports.
"""
