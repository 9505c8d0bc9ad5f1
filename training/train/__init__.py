"""Training: typed config, the driver (checks, Ray Train), the worker, optimizer, checkpoints."""
