"""The harness's foundation: errors, registries, parameter checks, devices, seeds, files,
datasets, models, metrics and records. Imports nothing else from ``bench``.
"""
