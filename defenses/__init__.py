"""Built-in defenses; importing this package registers them."""

from defenses import none, shrinkpad  # noqa: F401
