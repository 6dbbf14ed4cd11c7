"""Importance analysis passes: scores for weights, channels, neurons, heads, layers and tokens."""
