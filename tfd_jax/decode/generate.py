"""Autoregressive generation with a KV cache: a jitted prefill, then a jitted ``while_loop`` (Chapters 10, 13).

Chapter 13's loop is: run the prompt through the model, take the logits of the last position, pick a
token (Chapter 10: greedy, temperature, top-k, top-p), append it, repeat until an end-of-sequence
token or a length limit. Here that loop is two compiled programs:

1. **Prefill.** One forward pass over the prompts, right-padded to a common (bucketed) length ``P``,
   writes every prompt token's K and V into the cache and keeps the logits at each row's *last real*
   prompt token. It samples nothing, so it compiles once per shape whatever the sampling settings.
2. **Decode loop.** A ``lax.while_loop`` whose carry is a :class:`DecodeState` (cache, next-token
   logits, output buffer, per-row counts and done flags, RNG key, step). Each iteration samples one
   token per row from the carried logits, then runs that token through the model at the row's own
   position, writing its K/V in place. The loop ends when every row has produced an EOS, reached
   ``max_new_tokens`` or filled its cache. No value returns to Python between tokens.

   A whole generation (not a stream) can instead run as a loop of exactly ``N`` steps (the output
   buffer's width), ``loop="fixed"``: finished rows are masked, as they already are while other
   rows run, so the tokens, log-probabilities and lengths are the same, but the trip count is a
   constant the compiler knows. On a GPU that spares the runtime copying the loop condition to
   the host after every token, and lets the whole loop be one command buffer (CUDA graph); on a
   CPU the early exit is worth more. ``loop="auto"`` (the default) picks ``"fixed"`` on GPUs when
   no EOS can end the rows early and ``"while"`` otherwise; ``TFD_JAX_DECODE_LOOP`` overrides it.

Ragged prompts are exact. Row ``b`` with ``n_b`` real tokens holds padding K/V at positions
``n_b..P-1`` after prefill, but its first new token is fed at position ``n_b`` (over the padding),
the next at ``n_b + 1``, and so on. A query at position ``p`` only attends keys ``s <= p``
(``causal_mask(T, S_max, offset=lengths)``), and by the time a query sits at ``p`` every slot up to
``p`` holds a real token. Masks therefore come from the cache's per-row lengths, never from a ``tril``
over the padded buffer.

The compiled shapes are the batch size and three lengths rounded up to buckets
(:func:`~tfd_jax.decode.cache.bucket_length`): the padded prompt ``P``, the cache ``S_max`` (from the
longest prompt plus ``max_new_tokens``) and the output buffer ``N``. Everything else (each row's prompt
length, ``max_new_tokens``, temperature, top-p, EOS id, the seed) is a traced value, so another prompt
or output length in the same buckets reuses the compiled programs. The decode loop is also compiled
per :class:`SamplingSpec`: greedy or not, ``top_k`` (``lax.top_k`` needs a static ``k``) and whether a
top-p filter runs.

Shape letters: B batch, P padded prompt length, T new tokens per call, S_max cache length, N output
buffer length, V vocabulary, M model width.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from functools import partial
from typing import Iterator, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax import ops
from tfd_jax.decode.cache import KVCache, bucket_length
from tfd_jax.nn import with_layout

#: How many times each jitted function's Python body has been traced (traced = about to compile).
#: Tests read it to prove that a second call in the same bucket compiles nothing new.
TRACE_COUNTS: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------------------------
# The model's cached forward pass, jitted
# ----------------------------------------------------------------------------------------------


def _eval_model(graphdef, state):
    """Rebuild the model inside a traced function, with dropout off (inference) and its blocks one
    by one: a ``scan_layers`` model's stacked parameters are sliced here, once per call, outside
    the decode loop."""
    model = with_layout(nnx.merge(graphdef, state), scan_layers=False)
    model.eval()
    return model


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _forward_cached_jit(graphdef, state, tokens, cache, num_valid):
    TRACE_COUNTS["forward_cached"] += 1
    model = _eval_model(graphdef, state)
    h, cache = model.forward_cached(tokens, cache, num_valid)
    return model.logits(h), cache


def forward_cached(model, tokens, cache: KVCache, num_valid=None) -> tuple[jax.Array, KVCache]:
    """Logits for ``tokens`` appended to each cache row, and the cache with their K/V written (Chapter 13).

    The model's own ``forward_cached``, jitted, for teacher forcing and research: calling it once on a
    prompt and then once per token gives the same logits as one uncached forward over the whole
    sequence.

    Args:
      model: a causal model (``GPT``); dropout is switched off inside.
      tokens: int ``[B, T]``; row ``b``'s tokens take positions ``cache.lengths[b] + 0..T-1``.
      cache: from ``model.init_cache(B, S_max)``, with ``cache.lengths + T <= S_max`` in every row.
        It is donated: the returned cache reuses its buffers in place, and the one passed in can no
        longer be read (``jax.tree.map(jnp.copy, cache)`` first to keep it).
      num_valid: int ``[B]``, how many of the ``T`` tokens of each row are real (right padding);
        defaults to ``T``.
    Returns:
      float32 logits ``[B, T, V]`` and the new cache (lengths advanced by ``num_valid``).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    B, T = tokens.shape
    if B != cache.batch_size:
        raise ValueError(f"tokens have batch {B} but the cache has {cache.batch_size}")
    if int(jnp.max(cache.lengths)) + T > cache.max_length:
        raise ValueError(f"{T} more tokens do not fit a cache of length {cache.max_length} "
                         f"(longest row already holds {int(jnp.max(cache.lengths))})")
    num_valid = jnp.full((B,), T, jnp.int32) if num_valid is None else jnp.asarray(num_valid, jnp.int32)
    graphdef, state = nnx.split(model)
    return _forward_cached_jit(graphdef, state, tokens, cache, num_valid)


# ----------------------------------------------------------------------------------------------
# Sampling inside the loop: ops.sample, with the settings that shape the program kept static
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """The part of the sampling settings that shapes the compiled program.

    ``greedy``: argmax (temperature 0); ``top_k``: static ``k`` or None (``lax.top_k`` is fastest with
    a static ``k``); ``use_top_p``: whether a nucleus filter runs (its ``p`` and the temperature are
    traced values).
    """

    greedy: bool
    top_k: int | None
    use_top_p: bool


def _choose(logits: jax.Array, rng: jax.Array, knobs, spec: SamplingSpec) -> jax.Array:
    """One token per row from ``logits [B, V]``: ``ops.sample`` with the static and traced settings."""
    if spec.greedy:
        return ops.sample(rng, logits, temperature=0.0)
    return ops.sample(rng, logits, temperature=knobs.temperature, top_k=spec.top_k,
                      top_p=knobs.top_p if spec.use_top_p else None)


# ----------------------------------------------------------------------------------------------
# Prefill and the decode loop
# ----------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the decode loop carries from one token to the next (a pytree).

    Attributes:
      cache: the :class:`KVCache`; ``cache.lengths`` counts the tokens already fed to the model.
      logits: float32 ``[B, V]``, each row's next-token logits (from the last token fed).
      tokens: int32 ``[B, N]``, the new tokens so far (``pad_id`` after a row's end).
      log_probs: float32 ``[B, N]``, each new token's log-probability under the model
        (``ops.token_log_probs``: no temperature or filter); 0 after a row's end.
      num_new: int32 ``[B]``, how many new tokens each row has produced (an EOS counts).
      done: bool ``[B]``, rows that produced EOS, reached ``max_new_tokens`` or filled the cache.
      rng: PRNG key.
      step: int32 scalar, the next column of ``tokens`` to write.
    """

    cache: KVCache
    logits: jax.Array
    tokens: jax.Array
    log_probs: jax.Array
    num_new: jax.Array
    done: jax.Array
    rng: jax.Array
    step: jax.Array


class _Knobs(NamedTuple):
    """Traced per-call settings (changing them never recompiles)."""

    max_new: jax.Array  # int32 scalar
    eos_id: jax.Array  # int32 scalar, -1 for none
    pad_id: jax.Array  # int32 scalar
    temperature: jax.Array  # float32 scalar
    top_p: jax.Array  # float32 scalar


@partial(jax.jit, static_argnames=("graphdef", "cache_length"), donate_argnames=("tokens_out",))
def _prefill(graphdef, state, prompts, prompt_lengths, tokens_out, rng, context, *, cache_length):
    """Make the cache, feed the prompts ``[B, P]`` (right-padded; real lengths ``[B]``) and return
    the loop's first state.

    The cache is allocated here, by the model (``model.init_cache(B, S_max, **context)``): an
    encoder-decoder encodes its source at this point, once. Sampling is left to the loop, so this
    program depends only on the shapes, never on the sampling settings.
    """
    TRACE_COUNTS["prefill"] += 1
    return _prefill_model(_eval_model(graphdef, state), prompts, prompt_lengths, tokens_out, rng, context,
                          cache_length=cache_length)


def _prefill_model(model, prompts, prompt_lengths, tokens_out, rng, context, *, cache_length) -> "DecodeState":
    """:func:`_prefill`'s body for a model object (traceable inside any jitted function)."""
    cache = model.init_cache(prompts.shape[0], cache_length, **context)
    h, cache = model.forward_cached(prompts, cache, prompt_lengths)
    last_h = jnp.take_along_axis(h, (prompt_lengths - 1)[:, None, None], axis=1)  # [B, 1, M]
    B = prompts.shape[0]
    return DecodeState(cache=cache, logits=model.logits(last_h)[:, 0], tokens=tokens_out,
                       log_probs=jnp.zeros(tokens_out.shape, jnp.float32), num_new=jnp.zeros((B,), jnp.int32),
                       done=jnp.zeros((B,), bool), rng=rng, step=jnp.asarray(0, jnp.int32))


def _decode_step(model, s: DecodeState, knobs: _Knobs, spec: SamplingSpec) -> DecodeState:
    """Sample one token for every unfinished row, then feed it to get the next logits.

    Finished rows write ``pad_id`` and do not advance. A row is finished after its EOS, its
    ``max_new_tokens``-th token, or when its cache has no slot left for the token just sampled.
    """
    active = ~s.done
    rng, sub = jax.random.split(s.rng)
    tok = jnp.where(active, _choose(s.logits, sub, knobs, spec), knobs.pad_id)
    logp = jnp.where(active, ops.token_log_probs(s.logits, tok), 0.0)
    tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
    log_probs = jax.lax.dynamic_update_slice(s.log_probs, logp[:, None], (0, s.step))
    num_new = s.num_new + active.astype(jnp.int32)
    done = (s.done | (active & (tok == knobs.eos_id)) | (num_new >= knobs.max_new)
            | (s.cache.lengths >= s.cache.max_length))
    # The last iteration's forward is not needed by anyone; skipping it would need a lax.cond around
    # the cache update, and one extra step per generation is cheaper than risking a cache copy.
    h, cache = model.forward_cached(tok[:, None], s.cache, (~done).astype(jnp.int32))
    return DecodeState(cache=cache, logits=model.logits(h)[:, 0], tokens=tokens, log_probs=log_probs,
                       num_new=num_new, done=done, rng=rng, step=s.step + 1)


#: ``"while"``: stop as soon as every row is done; ``"fixed"``: exactly ``N`` steps, finished rows
#: masked (whole generations only); ``"auto"``: see :func:`decode_loop_kind`.
DecodeLoop = Literal["auto", "while", "fixed"]


def decode_loop_kind(loop: DecodeLoop = "auto", *, can_stop_early: bool = True) -> str:
    """The loop a whole generation runs: ``"while"`` or ``"fixed"``.

    ``"auto"`` reads ``TFD_JAX_DECODE_LOOP`` (``while`` / ``fixed``) if set; otherwise ``"fixed"`` on
    a GPU when no EOS can stop rows early (``can_stop_early=False``: the fixed loop then does no
    extra work, and the GPU runtime never waits on the loop condition), else ``"while"`` (CPUs and
    TPUs gain nothing from a known trip count, and an early exit saves whole forward passes).
    """
    if loop == "auto":
        loop = os.environ.get("TFD_JAX_DECODE_LOOP", "auto").strip().lower() or "auto"
    if loop == "auto":
        return "fixed" if jax.default_backend() == "gpu" and not can_stop_early else "while"
    if loop not in ("while", "fixed"):
        raise ValueError(f"unknown decode loop {loop!r}; choose 'auto', 'while' or 'fixed'")
    return loop


@partial(jax.jit, static_argnames=("graphdef", "spec", "loop"), donate_argnames=("dstate",))
def _decode_loop(graphdef, state, dstate: DecodeState, stop_at, knobs: _Knobs, *, spec, loop="while"):
    """Run the loop until every row is done or ``step == stop_at`` (the chunk end when streaming);
    ``loop="fixed"``: all ``N`` steps from step 0 (``stop_at`` must then be ``max_new_tokens``)."""
    TRACE_COUNTS["decode_loop"] += 1
    return _loop_model(_eval_model(graphdef, state), dstate, stop_at, knobs, spec, loop)


def _loop_model(model, dstate: DecodeState, stop_at, knobs: _Knobs, spec: SamplingSpec,
                loop: str = "while") -> DecodeState:
    """:func:`_decode_loop`'s body for a model object (traceable inside any jitted function).

    ``"while"`` checks after every token whether to go on. ``"fixed"`` runs ``N`` (the output
    buffer's width) steps from a fresh state: a row is done after its ``max_new_tokens``-th token
    (or EOS, or a full cache) either way, and a done row only writes ``pad_id``, so the tokens,
    log-probabilities and counts are the same; the carried logits, cache and step are not (steps
    past the end feed pad tokens), which is why streaming, which continues from them, uses
    ``"while"``.
    """

    def step(s):
        return _decode_step(model, s, knobs, spec)

    if loop == "fixed":
        return jax.lax.fori_loop(0, dstate.tokens.shape[1], lambda _, s: step(s), dstate)

    def cond(s):
        return (s.step < stop_at) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, step, dstate)


# ----------------------------------------------------------------------------------------------
# Input checks and the public API
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationPlan:
    """Checked inputs and the shapes they compile to (see :func:`plan_generation`).

    prompts: int32 ``[B, P]``, right-padded with 0; lengths: int32 ``[B]``; cache_length: ``S_max``;
    out_length: ``N``, the output buffer; spec: the static sampling settings; knobs: the traced ones;
    context: what ``model.init_cache`` takes besides the sizes (an encoder-decoder's padded source).
    """

    prompts: np.ndarray
    lengths: np.ndarray
    cache_length: int
    out_length: int
    spec: SamplingSpec
    knobs: _Knobs
    context: dict = dataclasses.field(default_factory=dict)


def _as_rows(prompts) -> list[np.ndarray]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise ValueError(f"a prompt array must be [batch, length], got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompt ids must be integers, got {arr.dtype}")
        return list(arr)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of token-id lists or an int array [batch, length]")
    rows = []
    for i, row in enumerate(prompts):
        if isinstance(row, (int, np.integer)):
            raise ValueError("prompts must be a list of token-id lists; wrap a single prompt as [ids]")
        arr = np.asarray(row)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"prompt {i} must be a flat list of integer token ids")
        rows.append(arr.astype(np.int64))
    return rows


def plan_generation(
    config,
    prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    source=None,
) -> GenerationPlan:
    """Check every input and fix the shapes (buckets) before anything is traced or compiled.

    Raises ``ValueError`` with a readable message for: no prompts or an empty prompt, ids outside the
    vocabulary, ``max_new_tokens < 1``, a prompt plus ``max_new_tokens`` longer than the context, a
    negative temperature, ``top_k < 1``, ``top_p`` outside (0, 1], and an EOS/pad id outside the
    vocabulary; for an encoder-decoder also a missing, empty or too long source, or one per prompt
    missing.
    """
    ops.check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, allow_greedy=True)
    context = {}
    if getattr(config, "is_encoder_decoder", False):  # the source is what it decodes from
        if source is None:
            raise ValueError("an encoder-decoder model decodes from a source: pass source=[token ids, ...]")
        context, n = _source_context(config, source)
        if prompts is None:
            prompts = [[config.decoder_start_id]] * n
    elif source is not None:
        raise ValueError("source= is for encoder-decoder models; a decoder-only model continues its prompts")
    if prompts is None:
        raise ValueError("no prompts given")
    rows = _as_rows(prompts)
    if context and len(rows) != context["source"].shape[0]:
        raise ValueError(f"{len(rows)} decoder prompts for {context['source'].shape[0]} sources; give one per source")
    V, C = config.vocab_size, config.context_length
    if not rows:
        raise ValueError("no prompts given")
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token to start from")
        if r.min() < 0 or r.max() >= V:
            raise ValueError(f"prompt {i} has token ids outside [0, {V}): min {r.min()}, max {r.max()}")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    max_new_tokens = int(max_new_tokens)
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > C:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) is "
            f"{longest + max_new_tokens}, beyond the model's context length {C}; shorten the prompt or "
            f"ask for at most {C - longest} new tokens"
        )
    for name, val in (("eos_id", eos_id), ("pad_id", pad_id)):
        if val is not None and not 0 <= int(val) < V:
            raise ValueError(f"{name} must be in [0, {V}), got {val}")
    S = bucket_length(longest + max_new_tokens, maximum=C)
    P = min(bucket_length(longest), S)
    N = bucket_length(max_new_tokens)
    padded = np.zeros((len(rows), P), np.int32)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    greedy = temperature == 0
    spec = SamplingSpec(
        greedy=greedy,
        top_k=None if (greedy or top_k is None or top_k >= V) else int(top_k),
        use_top_p=not greedy and top_p is not None and top_p < 1.0,
    )
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    knobs = _Knobs(
        max_new=jnp.asarray(max_new_tokens, jnp.int32),
        eos_id=jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
        pad_id=jnp.asarray(pad_id, jnp.int32),
        temperature=jnp.asarray(1.0 if greedy else temperature, jnp.float32),
        top_p=jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
    )
    return GenerationPlan(padded, np.array([len(r) for r in rows], np.int32), S, N, spec, knobs, context)


def _source_context(config, source) -> tuple[dict, int]:
    """An encoder-decoder's sources, right-padded to a bucketed length: ``{"source": int32 [B, S],
    "source_mask": bool [B, S]}`` and ``B``."""
    rows = _as_rows(source)
    if not rows:
        raise ValueError("no sources given")
    V, C = config.vocab_size, config.context_length
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"source {i} is empty")
        if r.min() < 0 or r.max() >= V:
            raise ValueError(f"source {i} has token ids outside [0, {V}): min {r.min()}, max {r.max()}")
        if r.size > C:
            raise ValueError(f"source {i} has {r.size} tokens, more than the model's context length {C}; truncate it")
    S = bucket_length(max(r.size for r in rows), maximum=C)
    padded = np.full((len(rows), S), config.pad_id, np.int32)
    valid = np.zeros((len(rows), S), bool)
    for i, r in enumerate(rows):
        padded[i, : r.size], valid[i, : r.size] = r, True
    return {"source": jnp.asarray(padded), "source_mask": jnp.asarray(valid)}, len(rows)


def _start(model, plan: GenerationPlan, key: jax.Array):
    """Split the model, allocate the output buffer, and run the prefill (no token yet)."""
    graphdef, state = nnx.split(model)
    B = plan.prompts.shape[0]
    tokens_out = jnp.full((B, plan.out_length), plan.knobs.pad_id, jnp.int32)
    dstate = _prefill(graphdef, state, jnp.asarray(plan.prompts), jnp.asarray(plan.lengths), tokens_out, key,
                      plan.context, cache_length=plan.cache_length)
    return graphdef, state, dstate


def _key(seed: int | None, key: jax.Array | None) -> jax.Array:
    if key is not None:
        return key
    return jax.random.key(seed)


class Chunk(NamedTuple):
    """A piece of a streamed generation.

    tokens: int32 ``[B, n]`` new tokens (``pad_id`` where a row had already finished);
    valid: bool ``[B, n]``, True for real tokens (an EOS is real); done: bool ``[B]`` after this chunk.
    """

    tokens: np.ndarray
    valid: np.ndarray
    done: np.ndarray


def generate_stream(
    model,
    prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int | None = None,
    chunk_size: int = 16,
    source=None,
) -> Iterator[Chunk]:
    """Like :func:`generate`, but yields the new tokens as they are produced (for the CLI).

    Each chunk comes from one call of the same compiled decode loop, which stops early at the chunk's
    end: the first chunk is a single token (so text appears as soon as possible), later ones hold up to
    ``chunk_size`` tokens.
    Concatenating the chunks gives exactly what :func:`generate` returns for the same arguments.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    plan = plan_generation(model.config, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_id=eos_id, pad_id=pad_id, source=source)
    graphdef, state, dstate = _start(model, plan, jax.random.key(seed))
    emitted = 0
    while True:
        tokens, num_new, done, step = jax.device_get((dstate.tokens, dstate.num_new, dstate.done, dstate.step))
        step = int(step)
        if step > emitted:
            cols = np.arange(emitted, step)
            yield Chunk(tokens[:, emitted:step], cols[None, :] < num_new[:, None], done)
            emitted = step
        if done.all() or step >= max_new_tokens:
            return
        stop_at = jnp.asarray(min(step + (chunk_size if step else 1), max_new_tokens), jnp.int32)
        # "while", spelled out: the same cache entry as generate's (jit keys on the keywords given).
        dstate = _decode_loop(graphdef, state, dstate, stop_at, plan.knobs, spec=plan.spec, loop="while")


def generate(
    model,
    prompts,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int | None = None,
    source=None,
    loop: DecodeLoop = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Continue each prompt by up to ``max_new_tokens`` tokens (Chapter 13's loop, with a KV cache).

    Args:
      model: a causal model (``GPT``) or an encoder-decoder; it is not modified (dropout is off inside).
      prompts: a list of token-id lists (lengths may differ) or an int array ``[B, T]``. For an
        encoder-decoder these start the target (None: each row starts from ``decoder_start_id``).
      max_new_tokens: how many tokens to produce per row at most; ``longest prompt + max_new_tokens``
        must fit the context length.
      temperature: 0 is greedy (argmax, and ``top_k``/``top_p`` have no effect); > 0 samples from
        ``softmax(logits / temperature)``.
      top_k: keep only the ``k`` most likely tokens (ties at the k-th kept); None for all.
      top_p: nucleus sampling, keep the most likely tokens until their mass reaches ``p``.
      seed: PRNG seed; the same seed and inputs give the same tokens.
      eos_id: a row stops after producing this token (it is included in the output); None never stops.
      pad_id: fills the output after a row stops; defaults to ``eos_id``, or 0.
      source: an encoder-decoder's inputs, one token-id list per row (lengths may differ); it is
        encoded once, and each layer's cross-attention keys/values with it (Chapter 19, Part 5).
      loop: ``"while"`` (stop when every row is done), ``"fixed"`` (a loop of known trip count,
        finished rows masked; the same tokens) or ``"auto"`` (:func:`decode_loop_kind`).
    Returns:
      ``(tokens, lengths)``: int32 numpy ``[B, max_new_tokens]`` and ``[B]``, where row ``b``'s new tokens
      are ``tokens[b, :lengths[b]]``.
    """
    out = rollout(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  key=jax.random.key(seed), eos_id=eos_id, pad_id=pad_id, source=source, loop=loop)
    tokens, lengths = jax.device_get((out.tokens, out.lengths))
    return np.asarray(tokens[:, :max_new_tokens], np.int32), np.asarray(lengths, np.int32)


class Rollout(NamedTuple):
    """What :func:`rollout` returns, all on the device.

    tokens: int32 ``[B, N]`` new tokens (``N`` is ``max_new_tokens`` rounded up to a bucket; ``pad_id``
    past each row's end); log_probs: float32 ``[B, N]``, each token's log-probability under the model
    (0 past the end); mask: bool ``[B, N]``, True on the response's real tokens (an EOS is real);
    lengths: int32 ``[B]``, how many new tokens each row has.
    """

    tokens: jax.Array
    log_probs: jax.Array
    mask: jax.Array
    lengths: jax.Array


def rollout(
    model,
    prompts,
    max_new_tokens: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    source=None,
    loop: DecodeLoop = "auto",
) -> Rollout:
    """Sample responses and keep everything on the device: tokens, their log-probabilities and the
    response mask (what policy-gradient training, Chapter 18, needs from a generation).

    The same prefill and decode loop as :func:`generate`; ``key`` is a ``jax.random.key`` (split it
    per call). Arguments otherwise as in :func:`generate` (here ``temperature`` defaults to 1: a rollout
    samples from the policy). Nothing is copied to the host.
    """
    plan = plan_generation(model.config, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_id=eos_id, pad_id=pad_id, source=source)
    graphdef, state, dstate = _start(model, plan, key)
    # A fixed loop runs the whole bucket; it does no extra work only when max_new_tokens fills it.
    kind = decode_loop_kind(loop, can_stop_early=eos_id is not None or max_new_tokens < plan.out_length)
    dstate = _decode_loop(graphdef, state, dstate, plan.knobs.max_new, plan.knobs, spec=plan.spec, loop=kind)
    mask = jnp.arange(dstate.tokens.shape[1])[None, :] < dstate.num_new[:, None]
    return Rollout(dstate.tokens, dstate.log_probs, mask, dstate.num_new)


def rollout_traced(
    model,
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    max_new_tokens: int,
    *,
    key: jax.Array,
    temperature: float | jax.Array = 1.0,
    eos_id: int | jax.Array = -1,
    pad_id: int | jax.Array = 0,
    loop: DecodeLoop = "auto",
) -> Rollout:
    """:func:`rollout` as a traceable function, for use inside a jitted program of one's own (PPO's
    training step samples its rollouts this way; Chapter 18). The same prefill and decode loop,
    without the host-side checks and buckets: the caller passes arrays of fixed shapes.

    ``model``: a causal model in eval mode; ``prompts`` int32 ``[B, P]`` right-padded, each row with
    ``prompt_lengths [B]`` real tokens (>= 1); ``max_new_tokens`` a Python int ``N`` (the output
    width), with ``P + N`` at most the context length; ``eos_id`` -1 for none. Sampling is at
    ``temperature`` from the full distribution (no top-k / top-p). Returns a :class:`Rollout` with
    ``tokens``, ``log_probs`` and ``mask`` ``[B, N]``, ``lengths [B]``. ``loop`` as in :func:`generate`
    (an ``eos_id`` that is not the Python int -1 counts as one that may stop rows early).
    """
    B, P = prompts.shape
    knobs = _Knobs(max_new=jnp.asarray(max_new_tokens, jnp.int32), eos_id=jnp.asarray(eos_id, jnp.int32),
                   pad_id=jnp.asarray(pad_id, jnp.int32), temperature=jnp.asarray(temperature, jnp.float32),
                   top_p=jnp.asarray(1.0, jnp.float32))
    tokens_out = jnp.full((B, max_new_tokens), knobs.pad_id, jnp.int32)
    dstate = _prefill_model(model, prompts, jnp.asarray(prompt_lengths, jnp.int32), tokens_out, key, {},
                            cache_length=P + max_new_tokens)
    kind = decode_loop_kind(loop, can_stop_early=not (isinstance(eos_id, int) and eos_id < 0))
    dstate = _loop_model(model, dstate, knobs.max_new, knobs, SamplingSpec(greedy=False, top_k=None, use_top_p=False),
                         kind)
    mask = jnp.arange(max_new_tokens)[None, :] < dstate.num_new[:, None]
    return Rollout(dstate.tokens, dstate.log_probs, mask, dstate.num_new)


def compiled_programs() -> dict[str, int]:
    """How many compiled variants each jitted entry point holds (jit's own cache sizes)."""
    return {
        "prefill": _prefill._cache_size(),
        "decode_loop": _decode_loop._cache_size(),
        "forward_cached": _forward_cached_jit._cache_size(),
    }
