"""Errors that cross layers: raised in training, mapped to exit codes by the nightly contract.

Kept free of torch so a process that only reads or repairs an output directory starts fast.
"""


class DivergenceError(RuntimeError):
    """Too many consecutive non-finite losses (or trained weights that must not be published)."""
