"""One module per Hugging Face `model_type`, each exporting `Family` (a subclass of base.MoEFamily).

Adding a family is one module here (the registry lists the package's modules).
"""

from __future__ import annotations

import importlib
import pkgutil

from edge_moe.errors import EdgeMoeError

_SHARED = ("base", "rope")  # what the families build on, not families
# every other module here is a family, named after its model_type: adding one is that module (and its tests)
FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SHARED))


def family_for(config: dict):
    """Returns the family object for a config.json dict.

    Raises:
        EdgeMoeError: the model_type is missing or not supported (the message lists the supported ones).
    """
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise EdgeMoeError(f"config.json: model_type {model_type!r} is not supported; supported: "
                           f"{', '.join(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{model_type}").Family(config)
