"""Built-in defenses; importing this package registers them."""

from defenses import (  # noqa: F401
    bdmae,  # noqa: F401
    btidbf,  # noqa: F401
    none,
    refine,  # noqa: F401
    shrinkpad,
)
