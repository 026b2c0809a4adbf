"""Training: optimizer, precision, sharding, the task-agnostic step, checkpoints, metrics and the
Trainer (Chapters 11, 14-17); objectives are tasks (``tfd_jax.train.tasks``)."""
from tfd_jax.train.config import resume_config
from tfd_jax.train.loop import RunFailed, Stopped, TrainConfig, Trainer, TrainingError, train
from tfd_jax.train.optim import OptimConfig, lr_schedule, make_optimizer
from tfd_jax.train.tasks import LMTask, MLMTask, Task, get_task, lm_loss

__all__ = ["LMTask", "MLMTask", "OptimConfig", "RunFailed", "Stopped", "Task", "TrainConfig", "Trainer",
           "TrainingError", "get_task", "lm_loss", "lr_schedule", "make_optimizer", "resume_config", "train"]
