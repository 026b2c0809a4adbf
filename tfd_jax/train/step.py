"""The training step: loss, gradients (accumulated over micro-batches), checks, one optimizer update.

Training state is a plain dict pytree so it can be sharded, donated and checkpointed as is:

    {"step": int32, "params": nnx.State, "opt_state": optax state, "rng": uint32 [2],
     "loss_scale": float32, "good_steps": int32, "nonfinite": int32, "nonfinite_streak": int32}

Shape letters: B batch, T sequence length, A gradient-accumulation micro-batches.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tfd_jax.train.precision import all_finite, initial_loss_scale, update_loss_scale


def split_model(model: nnx.Module):
    """(graphdef, params, rest): parameters apart from everything else (RNG streams, ...)."""
    return nnx.split(model, nnx.Param, ...)


def rng_tags(model: nnx.Module) -> tuple[str, ...]:
    """Names of the RNG streams the model's dropout layers draw from."""
    return tuple(
        sorted({s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
    )


def init_state(params, optimizer: optax.GradientTransformation, seed: int, precision: str) -> dict:
    """A fresh training state around ``params``."""
    return {
        "step": jnp.asarray(0, jnp.int32),
        "params": params,
        "opt_state": optimizer.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "loss_scale": initial_loss_scale(precision),
        "good_steps": jnp.asarray(0, jnp.int32),
        "nonfinite": jnp.asarray(0, jnp.int32),
        "nonfinite_streak": jnp.asarray(0, jnp.int32),
    }


def batch_loss_sums(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens) for a batch dict with ``tokens``, ``targets``,
    ``mask`` (all ``[B, T]``) and optionally ``positions`` and ``segment_ids``."""
    losses = model.token_losses(
        batch["tokens"], batch["targets"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
    )
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def make_train_step(
    graphdef,
    rest,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
    *,
    grad_accum: int = 1,
    dropout_tags: tuple[str, ...] = (),
    fp16: bool = False,
    growth_interval: int = 2000,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Build ``step(state, batch[, poison]) -> (state, metrics)`` (not yet jitted; the loop jits it).

    The loss is the mean over all counted tokens of the whole batch. With ``grad_accum = A`` the
    batch is cut into A micro-batches (row ``i`` goes to micro-batch ``i mod A``, so each one keeps
    rows from every device); their summed losses and gradients are added up and divided by the total
    token count once, which gives exactly the full-batch gradient (Chapter 15).

    A step whose loss or gradients are not finite changes nothing but the counters (``nonfinite``,
    ``nonfinite_streak``; Chapter 16), and with fp16 halves the loss scale. With fp16 the scale
    multiplies the mean token loss (Chapter 15's recipe), and a step whose loss is finite but
    whose scaled gradients overflowed while the scale can still come down is the scale search at
    work (metric ``overflow``): it is skipped but not counted in ``nonfinite_streak``, the count
    that stops a diverging run.
    """

    def loss_sums(params, batch, key):
        # copy=True: variables of this trace's own, so reseeding (and dropout's counters) may write them
        model = nnx.merge(graphdef, params, rest, copy=True)
        if dropout_tags:
            # match_shape: a scan_layers model's streams hold one key per layer ([L]); each gets its own.
            nnx.reseed(model, policy="match_shape", **{t: key for t in dropout_tags})
        return batch_loss_sums(model, batch)

    def grads_of(params, batch, key, scale):
        def scaled(p):
            s, c = loss_sums(p, batch, key)
            return s * scale, (s, c)


        (_, (s, c)), g = jax.value_and_grad(scaled, has_aux=True)(params)
        return g, s, c

    def step(state: dict, batch: dict, poison: jax.Array | float = 1.0) -> tuple[dict, dict]:
        # `poison` multiplies the loss; NaN there rehearses a diverged step (tests, --debug-nan-at).
        params, scale = state["params"], state["loss_scale"]
        if fp16:  # the scale is per token of a micro-batch: what the backward pass sees is the mean
            scale = scale / (batch["mask"].size // grad_accum)
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if grad_accum == 1:
            g, s, c = grads_of(params, batch, key, scale * poison)
        else:
            B = batch["tokens"].shape[0]
            micro = jax.tree.map(lambda x: x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, inp):
                i, mb = inp
                g, s, c = grads_of(params, mb, jax.random.fold_in(key, i), scale * poison)
                return jax.tree.map(jnp.add, carry, (g, s, c)), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
            (g, s, c), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
        count = jnp.maximum(c, 1.0)
        grads = jax.tree.map(lambda x: x / (scale * count), g)
        loss = s * poison / count
        loss_finite = jnp.isfinite(loss)
        finite = all_finite(grads) & loss_finite
        # fp16: overflow of the scaled gradients while the scale can still be lowered is its search
        overflow = (~finite & loss_finite & (state["loss_scale"] > 1.0)) if fp16 else jnp.asarray(False)
        diverging = ~finite & ~overflow
        grad_norm = optax.tree.norm(grads)

        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        if fp16:
            new_scale, good = update_loss_scale(state["loss_scale"], state["good_steps"], finite,
                                                growth_interval=growth_interval)
        else:
            new_scale, good = state["loss_scale"], state["good_steps"]
        new_state = {
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "rng": state["rng"],
            "loss_scale": new_scale,
            "good_steps": good,
            "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
            "nonfinite_streak": jnp.where(
                finite, 0, state["nonfinite_streak"] + diverging.astype(jnp.int32)).astype(jnp.int32),
        }
        param_norm = optax.tree.norm(params)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "update_ratio": optax.tree.norm(updates) / jnp.maximum(param_norm, 1e-12),
            "finite": finite,
            "loss_finite": loss_finite,
            "overflow": overflow,
            "tokens": c,
        }
        return new_state, metrics

    return step


def make_eval_step(graphdef, rest) -> Callable[[dict, dict], tuple[jax.Array, jax.Array]]:
    """``eval_step(params, batch) -> (loss sum, token count)`` with dropout off."""

    def eval_step(params, batch):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return batch_loss_sums(model, batch)

    return eval_step
