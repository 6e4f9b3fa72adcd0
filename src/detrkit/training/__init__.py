"""Training: the configuration and presets, the trainer and its parts, the epoch loop, schedules and training aids."""
