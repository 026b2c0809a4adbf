"""The benchmark scripts: ``bench.py --compare`` runs end to end, and its PyTorch peer is the same
architecture as tfd_jax's GPT (same weights in, same logits out)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax.models import GPT, GPTConfig

torch = pytest.importorskip("torch")

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tr = _load("torch_reference")
torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other

SHAKESPEARE_CPU = dict(vocab_size=65, d_model=128, num_heads=4, num_layers=4, context_length=64,
                       tie_embeddings=True, qkv_bias=False, out_bias=False, ffn_bias=False)
CONFIGS = {
    "shakespeare-cpu: no biases, tied head": GPTConfig.preset("tiny", **SHAKESPEARE_CPU),
    "gpt2-style biases, untied head": GPTConfig.preset(
        "tiny", vocab_size=97, context_length=32, num_layers=2, tie_embeddings=False, lm_head_bias=True
    ),
}


# These programs are tiny: skip XLA's CPU optimisation passes, which would dominate their run time.
FAST = {"xla_backend_optimization_level": 0}


def _model(cfg):
    """The model built by one compiled program (eager initialisation runs op by op, which is slower)."""
    make = lambda: GPT(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1], compiler_options=FAST)()
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def _logits(model, tokens):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t), compiler_options=FAST)
    return np.asarray(fn(state, jnp.asarray(tokens)))


def _flat_params(model) -> dict:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(k) for k in path): np.array(v[...]) for path, v in flat}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_reference_matches_tfd_jax_given_the_same_weights(name):
    cfg = CONFIGS[name]
    model = _model(cfg)
    flat = _flat_params(model)
    peer = tr.TorchGPT(cfg.to_dict())
    assert sum(p.numel() for p in peer.parameters()) == sum(a.size for a in flat.values()) == cfg.num_params()
    tr.load_tfd_jax_params(peer, flat)
    peer.eval()

    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(3, cfg.context_length), dtype=np.int32)
    ours = _logits(model, tokens)
    with torch.no_grad():
        theirs = peer(torch.as_tensor(tokens, dtype=torch.long)).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_torch_reference_cached_decode_matches_its_own_forward():
    """The peer's KV-cache decoder continues a prompt exactly as greedy argmax over full forwards."""
    cfg = CONFIGS["shakespeare-cpu: no biases, tied head"].to_dict()
    torch.manual_seed(0)
    peer = tr.TorchGPT(cfg).eval()
    prompt = torch.randint(0, cfg["vocab_size"], (2, 5))
    with torch.inference_mode():
        got = tr.GreedyDecoder(peer, 2, 32, torch.float32, torch.device("cpu")).generate(prompt, 10)
        seq = prompt
        for _ in range(10):
            seq = torch.cat([seq, peer(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq[:, 5:])


def test_bench_compare_runs_end_to_end_and_ends_with_the_ratio():
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"  # compile fast: this test checks that it runs
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(EXPERIMENTS / "bench.py"), "--compare", "--preset", "tiny", "--seq-len", "32",
           "--batch-size", "4", "--steps", "2", "--warmup", "1", "--new-tokens", "4", "--decode-batches", "1,2",
           "--scan-layers"]  # tfd_jax-only options pass through to its side
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    last = lines[-1]
    assert last["what"] == "compare" and last["ratio"] > 0
    assert set(last["decode_ratio"]) == {"1", "2"} and all(r > 0 for r in last["decode_ratio"].values())
    kinds = {(r.get("impl"), r["what"]) for r in lines}
    for impl in ("tfd_jax", "torch"):
        assert {(impl, "compile"), (impl, "train"), (impl, "decode")} <= kinds
    train = {r["impl"]: r for r in lines if r["what"] == "train"}
    # Same model on both sides: same parameter count and the same FLOP count per token.
    assert train["tfd_jax"]["num_params"] == train["torch"]["num_params"]
    assert train["tfd_jax"]["flops_per_token"] == train["torch"]["flops_per_token"]
    assert train["tfd_jax"]["recompiled_while_timing"] is False
    assert train["tfd_jax"]["scan_layers"] is True
    # Kernels per decoded token, counted in the compiled loop (no profiler): a positive figure.
    for r in lines:
        if r["what"] == "decode" and r["impl"] == "tfd_jax":
            assert r["loop"] in ("while", "fixed") and r["kernels_per_token"] > 0, r


def test_torch_reference_fused_adamw_equals_the_for_each_update():
    """The peer's fast optimizer path (fused AdamW, CPU too) takes the same steps as the for-each one."""
    cfg = CONFIGS["shakespeare-cpu: no biases, tied head"].to_dict()
    cfg = {**cfg, "d_ff": 4 * cfg["d_model"]}
    tokens = torch.randint(0, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    params = []
    for fused in (None, False):
        torch.manual_seed(0)
        peer = tr.TorchGPT(cfg)
        opt, sched = tr.make_optimizer(peer, dict(tr.DEFAULT_OPTIM, warmup_steps=0), 10, fused=fused)
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(peer(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        params.append([p.detach().clone() for p in peer.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
