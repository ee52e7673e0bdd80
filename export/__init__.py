"""edge_moe_export: turns a Hugging Face MoE checkpoint into an edge_moe model package, one tensor at a time."""
