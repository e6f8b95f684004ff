"""A run on disk: its directory, checkpoints, metrics log, and the signals that stop it."""
