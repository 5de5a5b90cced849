"""hdee: Heterogeneous Domain Expert Ensembles."""

__version__ = "0.1.0"
