"""Built-in attacks; importing this package registers them."""

from attacks import badnets, blended  # noqa: F401
