"""llamaherd: a complete, readable Llama stack."""
