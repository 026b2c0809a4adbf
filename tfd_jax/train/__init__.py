"""Training: optimizer, precision, sharding, the step, checkpoints, metrics and the loop (Chapters 11, 14-17)."""
from tfd_jax.train.loop import TrainConfig, TrainingError, train
from tfd_jax.train.optim import OptimConfig, lr_schedule, make_optimizer

__all__ = ["OptimConfig", "TrainConfig", "TrainingError", "lr_schedule", "make_optimizer", "train"]
