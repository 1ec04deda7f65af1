"""Dataset builders: generation log + annotations (or JSONL) -> training examples."""
