"""Meta-learning the Train-Attention model: the exact meta-gradient, episodes, the ZeRO-3 roles."""
