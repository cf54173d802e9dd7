"""User-facing errors.

Anything the user can fix (a typo in a name, a malformed YAML file, a missing dataset, an
impossible parameter) raises :class:`BenchError`. The CLI turns it into one line on stderr and
exit status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BenchError(Exception):
    """An error caused by the user's input, reported without a traceback."""


class UnknownNameError(BenchError):
    """A registry lookup for a name that is not registered."""
