"""Built-in defenses; importing this package registers them."""

from defenses import none, shrinkpad  # noqa: F401
from defenses import refine  # noqa: F401
from defenses import bdmae  # noqa: F401
from defenses import btidbf  # noqa: F401
