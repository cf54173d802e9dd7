"""Built-in attacks; importing this package registers them."""

from attacks import adaptive_patch, badnets, batt, blended, clean, label_consistent, physical_ba, wanet  # noqa: F401
