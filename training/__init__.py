"""Training: optimizer, sharding, train step, checkpoints, metrics and the loop."""
