"""Data sets.

The synthetic knowledge world and its tiny base, the LAMA-ckl release, the SmolLM2 conversion.
"""
