"""Results as people read them: tables, trade-off curves, t-SNE figures, trigger pictures and
the report page, built from records. Imports :mod:`bench.core`, :mod:`bench.nn` and plugins.
"""
