"""Running on many machines: connecting to Ray (embedded local or an existing cluster)."""
