"""edge_moe: run Mixture-of-Experts language models with less memory than the model needs.

    import edge_moe
    model = edge_moe.load("path/to/package")
    print(model.generate("def fibonacci(n):", max_new_tokens=32).text)
"""

import os as _os

__version__ = "0.1.0"

# onnxruntime 1.32 writes a telemetry database (device id, process path, OS, CPU) under
# ~/.cache/Microsoft/DeveloperTools when it is imported; only this variable, set before its import, stops it
# (disable_telemetry_events() afterwards does not). A user who wants it can set ORT_DISABLE_TELEMETRY=0.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .errors import EdgeMoeError  # noqa: E402
from .generate import GenerationResponse, GenerationResult  # noqa: E402
from .runtime import Model, load  # noqa: E402

__all__ = ["load", "Model", "GenerationResponse", "GenerationResult", "EdgeMoeError", "__version__"]
