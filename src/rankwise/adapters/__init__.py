"""Adapter methods, one module per family. Each module registers its methods when imported.

Every module in this package is imported by :func:`rankwise.core.registry.methods`, so adding a
method is adding a file here that ends with ``register(...)``.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
