"""derive: a symbolic-numeric derivation engine for the statistics of deep networks at initialisation."""

__version__ = "0.1.0"
