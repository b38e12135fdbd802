"""ckl-toolkit: continual knowledge learning with Train-Attention (TAALM)."""

__version__ = "0.1.0"
