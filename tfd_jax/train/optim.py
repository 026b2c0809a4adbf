"""Optimizers and learning-rate schedules (Chapters 11, 14 and 15).

``make_optimizer`` returns an optax chain of global-norm clipping and AdamW (or the course's plain
Adam) whose moments are kept in float32 whatever the parameter dtype, with weight decay applied only
to matrices (not to biases, norm scales or embedding tables).
"""
from __future__ import annotations

import re
from functools import partial
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings. The defaults are GPT-style AdamW; ``OptimConfig.course()`` is Chapter 11's Adam."""

    name: str = "adamw"  # "adamw" (decoupled weight decay) or "adam" (the course)
    lr: float = 6e-4  # peak learning rate
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100
    decay_steps: int | None = None  # where the cosine reaches min_lr; None = the run's total steps
    schedule: str = "cosine"  # "cosine" (warmup then cosine to min_lr) or "constant" (warmup then flat)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # also decay embedding tables (nanoGPT decays every 2-D parameter)
    clip_norm: float | None = 1.0
    # Run the update over flat vectors: the parameters that decay and those that do not each
    # concatenated into one vector (in the parameters' dtype, which must be one), updated as one
    # array (optax.flatten), instead of one update per parameter. An opt-in measured by
    # experiments/gpu_check.sh; the optimizer state is then one vector per moment and group, so a
    # run resumes only with the setting it started with.
    flat_update: bool = False

    @classmethod
    def course(cls) -> "OptimConfig":
        """Chapter 11: Adam, lr 1e-4, beta1 0.9, beta2 0.999, eps 1e-8, no schedule, no decay."""
        return cls(name="adam", lr=1e-4, min_lr=1e-4, warmup_steps=0, schedule="constant", b2=0.999, weight_decay=0.0)

    @classmethod
    def course_schedule(cls) -> "OptimConfig":
        """Chapter 14's schedule: 4,000 warmup steps to 6e-4, cosine down to 6e-5 at step 100,000."""
        return cls(lr=6e-4, min_lr=6e-5, warmup_steps=4000, decay_steps=100_000)


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr``.

    The course's Chapter 14 prints ``lr_max * 0.5 * (1 + cos(pi t / T))``, without the warmup offset
    or the floor; here the cosine runs over ``(t - warmup) / (decay_steps - warmup)`` and ends at
    ``min_lr`` (so step 4,000 is the 6e-4 peak and step 100,000 is 6e-5), and it stays at
    ``min_lr`` afterwards.
    """
    if cfg.lr <= 0:
        raise ValueError(f"learning rate must be positive, got {cfg.lr}")
    if cfg.schedule == "constant":
        if cfg.warmup_steps <= 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)], [cfg.warmup_steps]
        )
    if cfg.schedule != "cosine":
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose 'cosine' or 'constant'")
    decay = cfg.decay_steps or total_steps
    decay = max(decay, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=decay, end_value=cfg.min_lr
    )


# Parameters that are not decayed: biases, norm scales/biases and (by default) embedding tables.
_NO_DECAY = re.compile(r"(bias|scale)$")
_EMBEDDING = re.compile(r"embedding$")


def decay_mask(params, *, embeddings: bool = False) -> object:
    """A pytree of bools, True where weight decay applies: Linear kernels, and embedding tables too
    when ``embeddings`` is True."""

    def decide(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        name = re.sub(r"/value$", "", name)
        if _EMBEDDING.search(name):
            return embeddings
        return not _NO_DECAY.search(name)

    return jax.tree_util.tree_map_with_path(decide, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale the gradients down to global norm ``max_norm`` when it is larger (Chapter 16's clipping).

    The same rule and state (``optax.EmptyState``) as ``optax.clip_by_global_norm``, so checkpoints
    are interchangeable, but the factor ``max_norm / norm`` is one scalar that multiplies every
    element. optax divides each element by the norm inside an element-wise select, which XLA does
    not fuse into the moments' updates: on the CPU that is one extra pass over every parameter.
    Results agree to float rounding (``tests/train/test_optim.py``)."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _flat(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optax.flatten(inner)`` that also takes a tree with no parameters (a group that is empty,
    e.g. no undecayed parameters among LoRA factors) and refuses parameters of several dtypes,
    which one vector would promote to a common one."""
    flat = optax.flatten(inner)

    def check(params):
        dtypes = {jnp.dtype(x.dtype).name for x in jax.tree.leaves(params)}
        if len(dtypes) > 1:
            raise ValueError(f"TrainConfig.optim.flat_update puts the parameters in one vector, so they need one "
                             f"dtype; these have {sorted(dtypes)}: turn it off or give them one param_dtype")

    def init(params):
        check(params)
        return optax.EmptyState() if not jax.tree.leaves(params) else flat.init(params)

    def update(updates, state, params=None):
        return (updates, state) if not jax.tree.leaves(updates) else flat.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain and its schedule. Moments are float32 (``mu_dtype``)."""
    sched = lr_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm is not None:
        if cfg.clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive or None, got {cfg.clip_norm}")
        parts.append(clip_by_global_norm(cfg.clip_norm))
    if cfg.name not in ("adamw", "adam"):
        raise ValueError(f"unknown optimizer {cfg.name!r}; choose 'adamw' or 'adam'")
    adam = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=jnp.float32)
    decays = cfg.name == "adamw" and cfg.weight_decay != 0
    if not cfg.flat_update:
        if cfg.name == "adamw":
            parts.append(optax.adamw(sched, weight_decay=cfg.weight_decay,
                                     mask=partial(decay_mask, embeddings=cfg.decay_embeddings), **adam))
        else:
            parts.append(optax.adam(sched, **adam))
    elif not decays:
        parts.append(_flat(optax.adam(sched, **adam)))
    else:  # the decayed parameters in one vector, the others in another (each update is then uniform)
        labels = lambda params: jax.tree.map(  # noqa: E731
            lambda d: "decay" if d else "keep", decay_mask(params, embeddings=cfg.decay_embeddings))
        parts.append(optax.multi_transform(
            {"decay": _flat(optax.adamw(sched, weight_decay=cfg.weight_decay, **adam)),
             "keep": _flat(optax.adam(sched, **adam))}, labels))
    return optax.chain(*parts), sched
