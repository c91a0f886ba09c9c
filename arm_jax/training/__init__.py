"""Training: config, optimiser, state, pure steps, parallelism, checkpoints and the loop."""
