"""One module per Hugging Face model_type; see registry in __init__."""
