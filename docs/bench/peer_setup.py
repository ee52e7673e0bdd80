"""Device-side setup for the llama.cpp comparison: the issue's synthetic Qwen3-MoE (hidden 512, 12 layers, 32
experts, top-4, ffn 512, vocab 4096, uniform routing) with the default model's tokenizer, and our packages."""
import json, shutil, subprocess, sys
from pathlib import Path
from edge_moe_export.synthetic import write_synthetic_checkpoint, PRESETS
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
hf = root / "hf"
kw = dict(PRESETS["qwen3-moe-1gb"]); kw.update(vocab_size=4096, dtype="float16")
if not hf.exists():
    write_synthetic_checkpoint(hf, seed=0, popularity_skew=0.0, layer_correlation=0.0, progress=False, **kw)
    shutil.copy("edge_moe/default_model/tokenizer.json", hf / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
for name, extra in (("f16", ["--dtype", "float16"]), ("q8b8", ["--bits", "8", "--backbone-bits", "8"]),
                    ("q4b8", ["--bits", "4", "--backbone-bits", "8"]), ("q4", ["--bits", "4"])):
    if not (root / name).exists():
        subprocess.run([sys.executable, "-m", "edge_moe.cli", "export", str(hf), str(root / name), "--quiet", *extra], check=True)
print("setup done")
