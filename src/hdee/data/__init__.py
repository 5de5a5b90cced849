"""Data preparation: sources, splits, tokenizer, packing, loaders."""
