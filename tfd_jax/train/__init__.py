"""Training: optimizer, precision, sharding, the step, checkpoints, metrics and the loop (Chapters 11, 14-17)."""
from tfd_jax.train.config import resume_config
from tfd_jax.train.loop import RunFailed, Stopped, TrainConfig, TrainingError, train
from tfd_jax.train.optim import OptimConfig, lr_schedule, make_optimizer

__all__ = ["OptimConfig", "RunFailed", "Stopped", "TrainConfig", "TrainingError", "lr_schedule", "make_optimizer",
           "resume_config", "train"]
