"""edge_moe: run Mixture-of-Experts language models with less memory than the model needs.

    import edge_moe
    model = edge_moe.load("path/to/package")
    print(model.generate("def fibonacci(n):", max_new_tokens=32).text)
"""

__version__ = "0.1.0"

from .errors import EdgeMoeError  # noqa: E402
from .generate import GenerationResponse, GenerationResult  # noqa: E402
from .runtime import Model, load  # noqa: E402

__all__ = ["load", "Model", "GenerationResponse", "GenerationResult", "EdgeMoeError", "__version__"]
