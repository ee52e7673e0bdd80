"""One module per Hugging Face `model_type`, each exporting `Family` (a subclass of base.MoEFamily).

Adding DeepSeek-V2/V3, GPT-OSS, Phi-3.5-MoE or Granite-MoE is one module here plus its name in FAMILIES.
"""

from __future__ import annotations

import importlib

from edge_moe.errors import EdgeMoeError

FAMILIES = ("deepseek_v2", "deepseek_v3", "gpt_oss", "granitemoe", "granitemoeshared", "mixtral", "olmoe",
            "phimoe", "qwen2_moe", "qwen3_moe")


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
