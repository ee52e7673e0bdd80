"""edge_moe: run Mixture-of-Experts language models with less memory than the model needs."""

__version__ = "0.1.0"
