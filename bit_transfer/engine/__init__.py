"""What runs on the device: the optimiser, the train and eval steps, metrics."""
