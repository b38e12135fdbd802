"""Core blocks every job uses.

Typed recipes, atomic IO, checkpoints, losses, text spans, models, the TA model.
"""
