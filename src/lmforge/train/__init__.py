"""Training: the one loop, optimizers, schedules, metrics and the pretraining recipe."""
