"""Importance analysis and rewrite passes. Importing this package registers every pass kind.

Every module in this package is imported here, so a new pass only needs `@register` on
its class: no list to edit. (`passes.importance` holds analysis functions, imported by the
passes that use them.) A pass never imports a backend; it
imports `rewrite` (the IR) and `kernels` (custom ops).
"""
import importlib as _importlib
import pkgutil as _pkgutil

for _info in _pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")
