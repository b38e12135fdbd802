"""The training layer that both `ckl update` and `ckl eval` run.

Targets, token weights, batching, one weighted step.
"""
