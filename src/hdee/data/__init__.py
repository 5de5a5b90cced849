"""Data preparation: sources, splits, tokenizer, packing, loaders."""

from hdee.config import ConfigError


class DataError(ValueError):
    """Input data is unusable. The message names the corpus (domain) and the file or dataset, so
    the user knows exactly what to fix."""


class TooFewDocuments(DataError):
    """A corpus has fewer documents than its splits need (`corpus`: its name)."""

    def __init__(self, corpus: str, message: str) -> None:
        super().__init__(message)
        self.corpus = corpus


class DiscoveryError(ConfigError, DataError):
    """Domain discovery (data.discover, hdee.discover) cannot work with this corpus and these
    settings; the message names the key of data.discover to change (exit status 2, like any
    config error)."""
