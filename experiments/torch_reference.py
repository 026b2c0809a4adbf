"""A compact PyTorch GPT, used only as the peer that ``experiments/bench.py --compare`` measures against.

It is the architecture of tfd_jax's GPT-2-style presets, written out once in PyTorch: pre-LN blocks,
GELU (tanh), learned positions, a tied output head, biases where the config asks for them, and the
same optimizer (global-norm clipping, then AdamW with weight decay on matrices only and a warmup +
cosine schedule). It uses what a careful PyTorch user would: ``F.scaled_dot_product_attention`` with
``is_causal=True`` (flash attention on GPU), one fused Q/K/V matrix, bf16 autocast on CUDA,
``AdamW(fused=True)`` (CUDA and CPU; the for-each version where fused is unavailable), and
``torch.compile`` on CUDA when it works (eager with a note when it does not; eager on CPU unless
asked). On CPU it runs as many threads as torch's own default (one per physical core) within the
CPUs it may use. Forcing one thread per logical CPU puts two OpenMP threads on the two halves of
a hyper-threaded core, a likely (not verified) cause of this peer's eager step running slower than
a plain nanoGPT-style model's on a 2-vCPU AMD EPYC; on a 2-core Xeon without SMT the two counts
agree and the peer was already level with that plain model (32.4 against 32 ms). Decoding is its own greedy loop over a preallocated KV cache
with static shapes, replayed as a CUDA graph on GPU.

    python experiments/torch_reference.py --config-json '{"vocab_size": 65, ...}' --batch-size 12 --seq-len 64

prints one JSON object per measurement, like ``bench.py``. ``bench.py --impl torch`` and
``bench.py --compare`` build the config from a named preset and call this file.

Shape letters: B batch, T sequence length, S cache length, H heads, D head dim, M width, V vocab.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": lambda x: F.gelu(x),
    "relu": F.relu,
}

# The optimizer settings bench.py uses when none are given (tfd_jax's OptimConfig defaults).
DEFAULT_OPTIM = dict(lr=6e-4, min_lr=6e-5, warmup_steps=100, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)


def _check_supported(cfg: dict) -> None:
    problems = []
    if cfg.get("norm_position", "pre") != "pre":
        problems.append("norm_position must be 'pre'")
    if cfg.get("norm", "layernorm") != "layernorm":
        problems.append("norm must be 'layernorm'")
    if cfg.get("positions", "learned") not in ("learned", "none"):
        problems.append("positions must be 'learned' or 'none'")
    if cfg.get("activation", "gelu_tanh") not in _ACTIVATIONS:
        problems.append(f"activation must be one of {sorted(_ACTIVATIONS)}")
    if cfg.get("gated_ffn", False):
        problems.append("gated_ffn is not supported")
    if problems:
        raise ValueError("the torch reference covers GPT-2-style configs only: " + "; ".join(problems))


class Block(nn.Module):
    """``x + Attn(LN(x))`` then ``x + FFN(LN(x))`` (GPT-2's pre-LN block)."""

    def __init__(self, cfg: dict):
        super().__init__()
        M, F_ = cfg["d_model"], cfg["d_ff"] or 4 * cfg["d_model"]
        self.num_heads = cfg["num_heads"]
        eps, nb = cfg.get("norm_eps", 1e-5), cfg.get("norm_bias", True)
        self.ln1 = nn.LayerNorm(M, eps=eps, bias=nb)
        self.qkv = nn.Linear(M, 3 * M, bias=cfg.get("qkv_bias", True))  # W_Q, W_K, W_V side by side
        self.proj = nn.Linear(M, M, bias=cfg.get("out_bias", True))
        self.ln2 = nn.LayerNorm(M, eps=eps, bias=nb)
        self.fc_in = nn.Linear(M, F_, bias=cfg.get("ffn_bias", True))
        self.fc_out = nn.Linear(F_, M, bias=cfg.get("ffn_bias", True))
        self.act = _ACTIVATIONS[cfg.get("activation", "gelu_tanh")]

    def _heads(self, x):  # [B, T, 3M] -> three [B, H, T, D]
        B, T, M3 = x.shape
        return x.view(B, T, 3, self.num_heads, M3 // (3 * self.num_heads)).permute(2, 0, 3, 1, 4).unbind(0)

    def _merge(self, y):  # [B, H, T, D] -> [B, T, M]
        B, H, T, D = y.shape
        return y.transpose(1, 2).reshape(B, T, H * D)

    def forward(self, x):
        q, k, v = self._heads(self.qkv(self.ln1(x)))
        x = x + self.proj(self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        return x + self.fc_out(self.act(self.fc_in(self.ln2(x))))

    def forward_cached(self, x, k_cache, v_cache, pos, key_mask):
        """One position per row, ``x [B, T, M]`` at positions ``pos [T]``; K/V go into the caches
        ``[B, H, S, D]`` in place; queries see the keys where ``key_mask`` is True (``[T, S]``)."""
        q, k, v = self._heads(self.qkv(self.ln1(x)))
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=key_mask)
        x = x + self.proj(self._merge(y))
        return x + self.fc_out(self.act(self.fc_in(self.ln2(x))))


class TorchGPT(nn.Module):
    """tokens ``[B, T]`` -> logits ``[B, T, V]``; the config dict uses ``GPTConfig``'s field names."""

    def __init__(self, cfg: dict):
        super().__init__()
        _check_supported(cfg)
        self.cfg = dict(cfg)
        V, M, L = cfg["vocab_size"], cfg["d_model"], cfg["num_layers"]
        self.wte = nn.Embedding(V, M)
        self.wpe = nn.Embedding(cfg["context_length"], M) if cfg.get("positions", "learned") == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(L))
        self.ln_f = (
            nn.LayerNorm(M, eps=cfg.get("norm_eps", 1e-5), bias=cfg.get("norm_bias", True))
            if cfg.get("final_norm", True) else nn.Identity()
        )
        self.tied = cfg.get("tie_embeddings", True)
        self.head = None if self.tied else nn.Linear(M, V, bias=cfg.get("lm_head_bias", False))
        self._init_weights()

    def _init_weights(self):
        """GPT-2's: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2L)), zero biases, positions N(0, 0.01)."""
        L = self.cfg["num_layers"]
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith(("proj.weight", "fc_out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * L))
            elif name.startswith("wpe"):
                nn.init.normal_(p, std=0.01)
            else:
                nn.init.normal_(p, std=0.02)

    def embed(self, tokens, positions):
        x = self.wte(tokens)
        return x + self.wpe(positions) if self.wpe is not None else x

    def logits(self, h):
        h = self.ln_f(h)
        return F.linear(h, self.wte.weight) if self.tied else self.head(h)

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.embed(tokens, torch.arange(T, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.logits(x)


# ------------------------------------------------------------------------------------------------
# Weights from tfd_jax
# ------------------------------------------------------------------------------------------------


def load_tfd_jax_params(model: TorchGPT, flat: dict) -> None:
    """Copy tfd_jax GPT parameters into ``model``.

    ``flat`` maps tfd_jax's parameter paths (``"blocks/0/attn/q/kernel"``, ``"tok_embed/embedding"``,
    ...) to arrays. tfd_jax kernels are ``[in, out]`` and torch's are ``[out, in]``; Q, K and V are
    three matrices there and one here.
    """
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    sd = {"wte.weight": t(flat["tok_embed/embedding"])}
    if model.wpe is not None:
        sd["wpe.weight"] = t(flat["pos_embed/embedding"])
    for i, block in enumerate(model.blocks):
        p = f"blocks/{i}/"
        sd[f"blocks.{i}.qkv.weight"] = torch.cat([t(flat[p + f"attn/{n}/kernel"]).T for n in "qkv"], 0)
        if block.qkv.bias is not None:
            sd[f"blocks.{i}.qkv.bias"] = torch.cat([t(flat[p + f"attn/{n}/bias"]) for n in "qkv"], 0)
        pairs = [("proj", "attn/o"), ("fc_in", "ffn/w_in"), ("fc_out", "ffn/w_out")]
        for mine, theirs in pairs:
            sd[f"blocks.{i}.{mine}.weight"] = t(flat[p + theirs + "/kernel"]).T
            if getattr(block, mine).bias is not None:
                sd[f"blocks.{i}.{mine}.bias"] = t(flat[p + theirs + "/bias"])
        for ln in ("ln1", "ln2"):
            sd[f"blocks.{i}.{ln}.weight"] = t(flat[p + ln + "/scale"])
            if getattr(block, ln).bias is not None:
                sd[f"blocks.{i}.{ln}.bias"] = t(flat[p + ln + "/bias"])
    if isinstance(model.ln_f, nn.LayerNorm):
        sd["ln_f.weight"] = t(flat["final_norm/scale"])
        if model.ln_f.bias is not None:
            sd["ln_f.bias"] = t(flat["final_norm/bias"])
    if model.head is not None:
        sd["head.weight"] = t(flat["lm_head/kernel"]).T
        if model.head.bias is not None:
            sd["head.bias"] = t(flat["lm_head/bias"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KeyError(f"weights do not match: missing {missing}, unexpected {unexpected}")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def make_optimizer(model: TorchGPT, optim: dict, total_steps: int, fused: bool | None = None):
    """AdamW with decay on Linear matrices only (not biases, norms or embeddings), as tfd_jax's
    ``decay_mask``; linear warmup then cosine to ``min_lr``.

    ``fused``: one kernel for the whole update (None: wherever this torch has it for the parameters'
    device, CUDA and, since torch 2.4, CPU; otherwise the for-each version). On a 2-core Xeon the
    fused CPU update took about 1.5 ms off a plain nanoGPT-style Shakespeare CPU step (32.5 -> 31 ms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith(("wte", "wpe")) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=optim["lr"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"])
    if fused is None:
        try:
            opt = torch.optim.AdamW(groups, **kw, fused=True)
        except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or dtype
            opt = torch.optim.AdamW(groups, **kw, foreach=True)
    else:
        opt = torch.optim.AdamW(groups, **kw, fused=fused)
    warm, peak, floor = optim["warmup_steps"], optim["lr"], optim["min_lr"]
    decay_steps = max(total_steps, warm + 1)

    def factor(step):
        if step < warm:
            return step / max(warm, 1)
        frac = min((step - warm) / (decay_steps - warm), 1.0)
        return (floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))) / peak

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), which is what thread pools should use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pin_cpus(n: int) -> None:
    """Restrict this process to the first ``n`` CPUs it may use (call before any thread pool starts)."""
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:n])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "memory_kind": "device"}
    return {"peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "memory_kind": "host_rss"}


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({available_cpus()} cores, {torch.get_num_threads()} threads)"


def flops_per_token(cfg: dict, seq_len: int) -> tuple[float, int, int]:
    """tfd_jax's MFU count (``tfd_jax.train.metrics``), ``6 N + 6 L M T`` with N the parameters that
    take part in matrix products: all but the position table and, when untied, the input table."""
    M, L, V, C = cfg["d_model"], cfg["num_layers"], cfg["vocab_size"], cfg["context_length"]
    n_total = _count_params(cfg)
    n_lookup = (C * M if cfg.get("positions", "learned") == "learned" else 0)
    if not cfg.get("tie_embeddings", True):
        n_lookup += V * M
    return 6.0 * (n_total - n_lookup) + 6.0 * L * M * seq_len, n_total, n_total - n_lookup


def _count_params(cfg: dict) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in TorchGPT(cfg).parameters())


def _train_records(cfg, batch, seq_len, steps, *, device, precision, optim, compile_mode, seed, warmup) -> list[dict]:
    torch.manual_seed(seed)
    model = TorchGPT(cfg).to(device)
    model.train()
    use_bf16 = precision == "bf16"
    opt, sched = make_optimizer(model, optim, total_steps=steps + warmup)
    fused = bool(opt.defaults.get("fused"))
    params = [p for p in model.parameters()]
    V = cfg["vocab_size"]

    def loss_of(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        return F.cross_entropy(logits.float().view(-1, V), y.view(-1))

    want_compile = compile_mode == "on" or (compile_mode == "auto" and device.type == "cuda")
    compiled_loss = torch.compile(loss_of) if want_compile else loss_of
    notes = []

    def step(x, y, fn):
        loss = fn(x, y)
        loss.backward()
        if optim.get("clip_norm"):
            torch.nn.utils.clip_grad_norm_(params, optim["clip_norm"], foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, V, (batch, seq_len + 1), generator=g).to(device)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fn = compiled_loss
    t0 = time.perf_counter()
    try:
        first_loss = step(x, y, fn)
        _sync(device)
    except Exception as e:  # torch.compile is not available everywhere (no Triton, old GPU, ...)
        if fn is loss_of:
            raise
        notes.append(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); eager instead")
        fn = loss_of
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        first_loss = step(x, y, fn)
        _sync(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step(x, y, fn)
    _sync(device)

    times, cpu_times = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        loss = step(x, y, fn)
        _sync(device)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    t = time.perf_counter()
    for _ in range(steps):  # back to back, as a training loop runs: the throughput figure
        loss = step(x, y, fn)
    _sync(device)
    piped = (time.perf_counter() - t) / steps
    med = statistics.median(times)
    fpt, n_total, n_non_embed = flops_per_token(cfg, seq_len)
    mode = "torch.compile" if fn is not loss_of else "eager"
    base = dict(impl="torch", backend=device.type, device=_device_name(device), precision=precision,
                batch_size=batch, seq_len=seq_len, mode=mode)
    train = dict(
        base, what="train", steps=steps, ms_per_step=piped * 1e3, ms_per_step_sync=med * 1e3,
        ms_per_step_sync_min=min(times) * 1e3, cpu_ms_per_step=statistics.median(cpu_times) * 1e3,
        tokens_per_s=batch * seq_len / piped, flops_per_token=fpt,
        num_params=n_total, num_params_non_embedding=n_non_embed, mfu=None,
        loss_first=first_loss.item(), loss_last=loss.item(), attention="scaled_dot_product_attention(is_causal=True)",
        optimizer=f"AdamW({'fused' if fused else 'foreach'}) + clip_grad_norm_(foreach)", threads=torch.get_num_threads(),
        **_peak_memory(device),
    )
    if notes:
        train["note"] = "; ".join(notes)
    compile_rec = dict(base, what="compile", first_step_s=first_step_s, compile_s=max(first_step_s - piped, 0.0))
    return [compile_rec, train]


# ------------------------------------------------------------------------------------------------
# Decoding: greedy, preallocated cache, static shapes
# ------------------------------------------------------------------------------------------------


class GreedyDecoder:
    """Prefill a batch of equal-length prompts, then one token per step into a preallocated cache.

    Every step has the same shapes (the cache is ``[B, H, S, D]`` per layer and attention masks the
    unfilled slots), so on CUDA the step is captured once as a CUDA graph and replayed.
    """

    def __init__(self, model: TorchGPT, batch: int, cache_len: int, dtype, device):
        cfg = model.cfg
        H, D = cfg["num_heads"], cfg["d_model"] // cfg["num_heads"]
        self.model, self.device, self.S = model, device, cache_len
        self.k = [torch.zeros(batch, H, cache_len, D, dtype=dtype, device=device) for _ in model.blocks]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.key_pos = torch.arange(cache_len, device=device)
        self.graph = None

    def prefill(self, prompts):
        P = prompts.shape[1]
        pos = torch.arange(P, device=self.device)
        mask = self.key_pos[None, :] <= pos[:, None]  # [P, S]
        x = self.model.embed(prompts, pos)
        for block, k, v in zip(self.model.blocks, self.k, self.v):
            x = block.forward_cached(x, k, v, pos, mask)
        self.tok.copy_(self.model.logits(x[:, -1:]).argmax(-1))
        self.pos.fill_(P)
        return self.tok.clone()

    def _step(self):
        """Feed ``self.tok`` at ``self.pos``; leaves the next greedy token in ``self.tok`` (in place)."""
        mask = (self.key_pos <= self.pos)[None, :]  # [1, S]
        x = self.model.embed(self.tok, self.pos)
        for block, k, v in zip(self.model.blocks, self.k, self.v):
            x = block.forward_cached(x, k, v, self.pos, mask)
        self.tok.copy_(self.model.logits(x).argmax(-1))
        self.pos.add_(1)

    def capture(self):
        """Record one step as a CUDA graph (after warm-up steps on a side stream, as CUDA graphs need)."""
        saved_tok, saved_pos = self.tok.clone(), self.pos.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.tok.copy_(saved_tok)
        self.pos.copy_(saved_pos)

    def step(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def generate(self, prompts, new_tokens: int):
        out = [self.prefill(prompts)]
        for _ in range(new_tokens - 1):
            self.step()
            out.append(self.tok.clone())
        return torch.cat(out, 1)


def _decode_records(model, cfg, batches, prompt_len, new_tokens, *, device, precision, seed) -> list[dict]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    net = copy.deepcopy(model).to(device=device, dtype=dtype).eval()  # inference weights in the compute dtype
    cache_len = min(_bucket(prompt_len + new_tokens), cfg["context_length"])
    records = []
    for B in batches:
        g = torch.Generator().manual_seed(seed + B)
        prompts = torch.randint(0, cfg["vocab_size"], (B, prompt_len), generator=g).to(device)
        with torch.inference_mode():
            dec = GreedyDecoder(net, B, cache_len, dtype, device)
            note, mode = None, "eager"
            if device.type == "cuda":
                try:
                    dec.prefill(prompts)
                    dec.capture()
                    mode = "cuda_graph"
                except Exception as e:
                    note = f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); eager instead"
                    dec = GreedyDecoder(net, B, cache_len, dtype, device)
            dec.generate(prompts, new_tokens)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            out = dec.generate(prompts, new_tokens)
            _sync(device)
            dt = time.perf_counter() - t0
        rec = dict(impl="torch", what="decode", backend=device.type, device=_device_name(device), precision=precision,
                   batch_size=B, prompt_len=prompt_len, new_tokens=new_tokens, cache_len=cache_len, seconds=dt,
                   tokens_per_s=B * new_tokens / dt, ms_per_token_step=dt / new_tokens * 1e3, mode=mode,
                   first_tokens=out[0, :8].tolist())
        if note:
            rec["note"] = note
        records.append(rec)
    return records


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def bench_torch(
    cfg_dict: dict,
    batch: int,
    seq_len: int,
    steps: int,
    decode: bool,
    *,
    precision: str | None = None,
    optim: dict | None = None,
    device: str | None = None,
    compile_mode: str = "auto",
    warmup: int = 3,
    decode_batches=(1, 16),
    prompt_len: int = 16,
    new_tokens: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> list[dict]:
    """Train-step (and optionally decoding) measurements of the torch reference, as JSON-able dicts.

    ``cfg_dict`` holds ``GPTConfig`` fields. ``precision``: "bf16" (autocast) or "fp32"; default bf16
    on CUDA, fp32 on CPU. ``compile_mode``: "auto" (torch.compile on CUDA only), "on" or "off".
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # torch's default is one thread per physical core; never more than the CPUs we may run on.
    torch.set_num_threads(threads or min(torch.get_num_threads(), available_cpus()))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as XLA does for float32 matmuls on GPU
        torch.backends.cudnn.allow_tf32 = True
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    optim = {**DEFAULT_OPTIM, **(optim or {})}
    cfg = {**cfg_dict, "d_ff": cfg_dict.get("d_ff") or 4 * cfg_dict["d_model"]}
    if seq_len > cfg["context_length"]:
        raise ValueError(f"seq_len {seq_len} exceeds context_length {cfg['context_length']}")
    records = _train_records(cfg, batch, seq_len, steps, device=dev, precision=precision, optim=optim,
                             compile_mode=compile_mode, seed=seed, warmup=warmup)
    if decode:
        torch.manual_seed(seed)
        model = TorchGPT(cfg)
        new = new_tokens or max(min(cfg["context_length"] - prompt_len, 256), 1)
        records += _decode_records(model, cfg, decode_batches, prompt_len, new, device=dev, precision=precision, seed=seed)
    return records


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-json", required=True, help="GPTConfig fields as a JSON object")
    ap.add_argument("--optim-json", default=None, help="optimizer settings (lr, min_lr, warmup_steps, b1, b2, eps, weight_decay, clip_norm)")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--compile", dest="compile_mode", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--decode-batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=None, help="run on this many CPUs (affinity), threads to match")
    args = ap.parse_args(argv)
    if args.cpus:
        pin_cpus(args.cpus)
    records = bench_torch(
        json.loads(args.config_json), args.batch_size, args.seq_len, args.steps, args.decode,
        precision=args.precision, optim=json.loads(args.optim_json) if args.optim_json else None, device=args.device,
        compile_mode=args.compile_mode, warmup=args.warmup,
        decode_batches=tuple(int(b) for b in args.decode_batches.split(",") if b),
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, seed=args.seed,
    )
    for r in records:
        print(json.dumps(r), flush=True)
    return records


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
