"""Data preparation: sources, splits, tokenizer, packing, loaders."""


class DataError(ValueError):
    """Input data is unusable. The message names the corpus (domain) and the file or dataset, so
    the user knows exactly what to fix."""
