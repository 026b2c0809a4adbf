"""The training step for any task: its loss, gradients (accumulated over micro-batches), checks, one update.

The step knows no model family and no objective. A task gives a loss function

    loss_fn(model, batch, frozen) -> (loss_sum, count, metrics)

(the summed loss over what the batch counts, how many things it counted, and a dict of further sums
to report per counted thing), and optionally ``prepare(batch, key) -> batch``, run inside the step
before the loss (masked-LM masking draws its masks there, from the step's key, so a resumed run
masks exactly as an uninterrupted one). ``frozen`` is any pytree the loss needs but never trains (a
reference model's parameters, later): passed in as an argument, sharded, not donated.

A task that makes its own data from the model (PPO's rollouts, Chapter 18) gives
``experience(policy, frozen, buffer, batch, step, key) -> (buffer, batch)``: run first, with the
current weights (no gradient, dropout off), it may refresh ``buffer`` (the experience, a pytree
kept in the training state, so a resumed run continues from exactly the same one) and returns the
batch the loss trains on (a minibatch of it).

Training state is a plain dict pytree so it can be sharded, donated and checkpointed as is:

    {"step": int32, "params": nnx.State, "opt_state": optax state, "rng": uint32 [2],
     "loss_scale": float32, "good_steps": int32, "nonfinite": int32, "nonfinite_streak": int32}

plus ``"fixed"``, the model's parameters that do not train, when a task trains only some of them
(``params`` then holds the trainable ones), and ``"buffer"``, a task's experience.

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


def split_trainable(model: nnx.Module, trainable=nnx.Param):
    """(graphdef, trainable params, fixed params, rest): what trains, the other parameters, and
    everything else. ``trainable`` is an NNX filter over parameters (all of them by default, e.g.
    ``nnx.PathContains("classifier")`` for only a new head)."""
    return nnx.split(model, nnx.All(nnx.Param, trainable), nnx.Param, ...)


def merge_model(graphdef, params, fixed, rest, **kwargs) -> nnx.Module:
    """The inverse of :func:`split_trainable` (``fixed`` may be an empty ``nnx.State``)."""
    return nnx.merge(graphdef, params, fixed, rest, **kwargs)


def rng_tags(model: nnx.Module) -> tuple[str, ...]:
    """Names of the RNG streams the model's dropout layers draw from."""
    return tuple(
        sorted({s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
    )


def init_state(params, optimizer: optax.GradientTransformation, seed: int, precision: str, fixed=None,
               buffer=None) -> dict:
    """A fresh training state around ``params`` (and the ``fixed`` parameters, when some do not
    train, and a task's experience ``buffer``)."""
    extra = {"fixed": fixed} if fixed is not None and jax.tree.leaves(fixed) else {}
    if buffer is not None:
        extra["buffer"] = buffer
    return extra | {
        "step": jnp.asarray(0, jnp.int32),
        "params": params,
        "opt_state": optimizer.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "loss_scale": initial_loss_scale(precision),
        "good_steps": jnp.asarray(0, jnp.int32),
        "nonfinite": jnp.asarray(0, jnp.int32),
        "nonfinite_streak": jnp.asarray(0, jnp.int32),
    }


def make_train_step(
    graphdef,
    rest,
    optimizer: optax.GradientTransformation,
    schedule: Callable,
    loss_fn: Callable,
    *,
    prepare: Callable | None = None,
    experience: Callable | None = None,
    grad_accum: int = 1,
    dropout_tags: tuple[str, ...] = (),
    fp16: bool = False,
    growth_interval: int = 2000,
    guard: str = "auto",
    local_rows=None,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Build ``step(state, batch, poison, frozen) -> (state, metrics)`` (not yet jitted; the Trainer jits it).

    ``loss_fn(model, batch, frozen) -> (loss_sum, count, metric sums)``, ``prepare(batch, key)`` and
    ``experience(policy, frozen, buffer, batch, step, key)`` as in the module notes; ``graphdef`` and
    ``rest`` are from :func:`split_model`.

    The loss is the mean over all counted tokens (or examples) of the whole batch. With ``grad_accum = A`` the
    batch is cut into A micro-batches (row ``i`` goes to micro-batch ``i mod A``, so each one keeps
    rows from every device); their summed losses and gradients are added up and divided by the total
    token count once, which gives exactly the full-batch gradient (Chapter 15).

    A step whose loss or gradients are not finite changes nothing but the counters (``nonfinite``,
    ``nonfinite_streak``; Chapter 16), and with fp16 halves the loss scale. With fp16 the scale
    multiplies the mean token loss (Chapter 15's recipe), and a step whose loss is finite but
    whose scaled gradients overflowed while the scale can still come down is the scale search at
    work (metric ``overflow``): it is skipped but not counted in ``nonfinite_streak``, the count
    that stops a diverging run.

    ``guard`` says how a step that is not finite keeps the old state. ``"select"`` computes the
    update and then picks, element by element, the new or the old value of every parameter and
    moment (``jnp.where``); ``"cond"`` runs the update inside ``lax.cond``, so a finite step writes
    the new state and does nothing else. Both give the same state and metrics
    (``tests/perf/test_fast_paths.py``). ``"auto"`` (the default) takes ``"cond"`` on the CPU, where
    XLA runs the selects as ~3 extra operations per parameter (about 1-2 ms of a 38 ms
    Shakespeare step), and ``"select"`` elsewhere: a GPU conditional copies its predicate to the
    host every step, while the selects fuse into the update's own kernels.

    ``local_rows`` (a mesh whose only axis longer than 1 is ``data``, or None) makes each device
    compute the loss sums and gradients of its own rows (``jax.shard_map``) and add them up across
    devices as one flat buffer in one all-reduce. Without it the partitioner reduces the gradients
    as one all-reduce of one buffer per parameter, and XLA's CPU runtime makes the devices meet at
    every buffer (about 6 ms of a 2-device Shakespeare step for 47 buffers). The step is the same
    up to float rounding (``tests/perf/test_fast_paths.py``), except that dropout draws each
    device's masks from the step's key folded with the device's index. It needs a loss whose sums
    over part of the batch add up to the whole batch's (``Task.rows_add_up``); the Trainer passes
    its mesh on the CPU when that holds.
    """
    if guard not in ("auto", "cond", "select"):
        raise ValueError(f"guard must be 'auto', 'cond' or 'select', got {guard!r}")

    def loss_sums(params, fixed, batch, key, frozen):
        # copy=True: variables of this trace's own, so reseeding (and dropout's counters) may write them
        model = merge_model(graphdef, params, fixed, rest, copy=True)
        if dropout_tags:
            # match_shape: a scan_layers model's streams hold one key per layer ([L]); each gets its own.
            nnx.reseed(model, policy="match_shape", **{t: key for t in dropout_tags})
        s, c, extra = loss_fn(model, batch, frozen)
        return jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32), extra

    def grads_of(params, fixed, batch, key, scale, frozen):
        def scaled(p):
            s, c, extra = loss_sums(p, fixed, batch, key, frozen)
            return s * scale, (s, c, extra)

        (_, (s, c, extra)), g = jax.value_and_grad(scaled, has_aux=True)(params)
        return g, s, c, extra

    def summed_grads(params, fixed, batch, key, scale, frozen):
        """(gradient sums, loss sum, count, metric sums) over the batch's micro-batches."""
        if grad_accum == 1:
            return grads_of(params, fixed, batch, key, scale, frozen)
        B = batch["tokens"].shape[0]
        micro = jax.tree.map(lambda x: x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)
        shapes = jax.eval_shape(lambda mb: loss_sums(params, fixed, mb, key, frozen)[2],
                                jax.tree.map(lambda x: x[0], micro))

        def body(carry, inp):
            i, mb = inp
            out = grads_of(params, fixed, mb, jax.random.fold_in(key, i), scale, frozen)
            return jax.tree.map(jnp.add, carry, out), None

        zeros = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0),
                 jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
        return jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))[0]

    if local_rows is not None:
        summed_grads = _per_device_rows(summed_grads, local_rows)

    def step(state: dict, batch: dict, poison: jax.Array | float = 1.0, frozen=None) -> tuple[dict, dict]:
        # `poison` multiplies the loss; NaN there rehearses a diverged step (tests, --debug-nan-at).
        params, scale = state["params"], state["loss_scale"]
        fixed = state.get("fixed", nnx.State({}))
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if prepare is not None:  # the task's per-step randomness (masking), from the step's own key
            batch = prepare(batch, jax.random.fold_in(key, 1 << 20))
        buffer = state.get("buffer")
        if experience is not None:  # the task's own data from the current weights (PPO's rollouts)
            policy = merge_model(graphdef, jax.lax.stop_gradient(params), fixed, rest, copy=True)
            policy.eval()
            buffer, batch = experience(policy, frozen, buffer, batch, state["step"],
                                       jax.random.wrap_key_data(state["rng"]))
        if fp16:  # the scale is per token of a micro-batch: what the backward pass sees is the mean
            scale = scale / (batch["mask"].size // grad_accum)
        g, s, c, extra = summed_grads(params, fixed, batch, key, scale * poison, frozen)
        count = jnp.maximum(c, 1.0)
        grads = jax.tree.map(lambda x: x / (scale * count), g)
        loss = s * poison / count
        loss_finite = jnp.isfinite(loss)
        finite = all_finite(grads) & loss_finite
        # fp16: overflow of the scaled gradients while the scale can still be lowered is its search
        overflow = (~finite & loss_finite & (state["loss_scale"] > 1.0)) if fp16 else jnp.asarray(False)
        diverging = ~finite & ~overflow
        grad_norm = optax.tree.norm(grads)

        param_norm = optax.tree.norm(params)

        def update(grads, opt_state, params):
            updates, new_opt = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            # update_ratio's norm from how far the parameters moved, not from `updates`: the
            # optimizer's last product (Adam's division) then has one reader and fuses into the
            # new parameters instead of being written out (one pass less per parameter on the CPU)
            return new_params, new_opt, optax.tree.norm(jax.tree.map(jnp.subtract, new_params, params))

        if (guard == "auto" and jax.default_backend() == "cpu") or guard == "cond":
            # a skipped step's update is not computed: its norm is reported as NaN, as `select`'s
            # non-finite update gives
            new_params, new_opt, update_norm = jax.lax.cond(
                finite, update, lambda g, o, p: (p, o, jnp.float32(jnp.nan)), grads, state["opt_state"], params)
        else:
            new_params, new_opt, update_norm = update(grads, state["opt_state"], params)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            new_params, new_opt = keep(new_params, params), keep(new_opt, state["opt_state"])
        if fp16:
            new_scale, good = update_loss_scale(state["loss_scale"], state["good_steps"], finite,
                                                growth_interval=growth_interval)
        else:
            new_scale, good = state["loss_scale"], state["good_steps"]
        new_state = dict(state) | {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": new_opt,
            "rng": state["rng"],
            **({"buffer": buffer} if buffer is not None else {}),
            "loss_scale": new_scale,
            "good_steps": good,
            "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
            "nonfinite_streak": jnp.where(
                finite, 0, state["nonfinite_streak"] + diverging.astype(jnp.int32)).astype(jnp.int32),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "update_ratio": update_norm / jnp.maximum(param_norm, 1e-12),
            "finite": finite,
            "loss_finite": loss_finite,
            "overflow": overflow,
            "tokens": c,
            **{name: v / count for name, v in extra.items()},
        }
        return new_state, metrics

    return step


def make_multi_step(step: Callable, steps: int) -> Callable:
    """``multi(state, batches, poison=1.0, frozen=None) -> (state, metrics)``: ``steps`` calls of a
    training step from :func:`make_train_step` as one program (a ``lax.scan``), for one dispatch.

    ``batches`` holds ``steps`` batches stacked on a new leading axis (``[steps, B, T]``), ``poison``
    is a scalar or one value per step, and every metric comes back stacked the same way
    (``[steps]``). The state after it equals that of ``steps`` single calls (float rounding apart;
    ``tests/perf/test_fast_paths.py``). Each call of a jitted step costs the host the flattening,
    donation and bookkeeping of the ~140 buffers of the training state (2-3 ms for the Shakespeare
    CPU model), and on a CPU the host shares its cores with the computation, so that time is taken
    from the step; one call per ``steps`` steps divides it by ``steps``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")

    def multi(state: dict, batches: dict, poison: jax.Array | float = 1.0, frozen=None):
        lead = {x.shape[0] for x in jax.tree.leaves(batches)}
        if lead != {steps}:
            raise ValueError(f"batches must be {steps} batches stacked on a leading axis; got leading sizes {sorted(lead)}")
        poisons = jnp.broadcast_to(jnp.asarray(poison, jnp.float32), (steps,))
        return jax.lax.scan(lambda st, xs: step(st, xs[0], xs[1], frozen), state, (batches, poisons))

    return multi


def _per_device_rows(summed_grads: Callable, mesh, axis: str = "data") -> Callable:
    """``summed_grads`` run by each device on its rows of the batch, the results added up across
    devices as one flat buffer (one all-reduce). Same arguments and results as ``summed_grads``."""
    from jax.flatten_util import ravel_pytree
    from jax.sharding import PartitionSpec as P

    longer = {name: n for name, n in mesh.shape.items() if n > 1 and name != axis}
    if longer:
        raise ValueError(f"local_rows needs a mesh that splits only {axis!r}; this one also splits {longer}")

    def local(params, fixed, batch, key, scale, frozen):
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))  # each device its own dropout masks
        flat, unravel = ravel_pytree(summed_grads(params, fixed, batch, key, scale, frozen))
        return unravel(jax.lax.psum(flat, axis))

    rep = P()
    # check_vma=False: custom VJPs (the output head's) give per-device gradients of replicated weights
    return jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, P(axis), rep, rep, rep), out_specs=rep,
                         check_vma=False)


def make_eval_step(graphdef, rest, loss_fn: Callable, *, prepare: Callable | None = None, seed: int = 0) -> Callable:
    """``eval_step(params, fixed, batch, frozen) -> (loss sum, count, metric sums)`` with dropout off.

    ``prepare`` draws from a key fixed by ``seed``, so every evaluation masks the same positions."""

    def eval_step(params, fixed, batch, frozen=None):
        model = merge_model(graphdef, params, fixed, rest)
        model.eval()
        if prepare is not None:
            batch = prepare(batch, jax.random.key(seed + 54321))
        return loss_fn(model, batch, frozen)

    return eval_step
