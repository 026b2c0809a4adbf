"""The training step against independent references: the full batch, a single device, one process."""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fastjit import FAST
from tfd_jax import runtime
from tfd_jax.models import GPT, GPTConfig
from tfd_jax.train import loop
from tfd_jax.train import sharding as shd
from tfd_jax.train.config import TrainConfig, TrainingError
from tfd_jax.train.metrics import read_metrics
from tfd_jax.train.optim import OptimConfig, make_optimizer
from tfd_jax.train.step import init_state, make_train_step, rng_tags, split_model
from tfd_jax.train.tasks import lm_loss

CFG = GPTConfig.preset("tiny", vocab_size=61, d_model=32, num_heads=4, num_layers=2, context_length=16)


def make_batch(B, T=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, size=(B, T + 1)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[0, :5] = False  # uneven token counts across rows and micro-batches
    mask[3, -2:] = False
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def setup(cfg=CFG, grad_accum=1, sgd=False):
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(model)
    if sgd:  # the update is then lr * gradient, so comparing parameters compares gradients
        opt, sched = optax.sgd(1.0), optax.constant_schedule(1.0)
    else:
        opt, sched = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    step = make_train_step(graphdef, rest, opt, sched, lm_loss, grad_accum=grad_accum)
    return step, init_state(params, opt, 0, "fp32")


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_gradient_accumulation_equals_full_batch():
    batch = make_batch(32)
    full_step, state = setup(grad_accum=1, sgd=True)
    acc_step, state2 = setup(grad_accum=4, sgd=True)
    s1, m1 = jax.jit(full_step)(state, batch)
    s2, m2 = jax.jit(acc_step)(state2, batch)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
    assert max_diff(s1["params"], s2["params"]) < 1e-6
    # and the update really moved the parameters
    assert max_diff(s1["params"], state["params"]) > 1e-3


def test_loss_matches_a_numpy_cross_entropy():
    batch = make_batch(4)
    step, state = setup()
    _, m = jax.jit(step)(state, batch)
    model = nnx.merge(*split_model(GPT(CFG, rngs=nnx.Rngs(0))))
    logits = np.asarray(model(jnp.asarray(batch["tokens"])), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    assert float(m["loss"]) == pytest.approx(float((nll * batch["mask"]).sum() / batch["mask"].sum()), rel=1e-5)


def test_fp16_loss_scale_search_is_not_divergence():
    """Overflow under a too-large loss scale halves the scale and skips the update without counting
    towards the divergence streak; a non-finite loss does count. The scale multiplies the mean
    token loss, and the gradient comes back unscaled (compared with float32)."""
    opt, sched = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    graphdef, params, rest = split_model(GPT(CFG.replace(dtype="float16"), rngs=nnx.Rngs(0)))
    step = jax.jit(make_train_step(graphdef, rest, opt, sched, lm_loss, fp16=True), compiler_options=FAST)
    batch = make_batch(4)
    state = init_state(params, opt, 0, "fp16")
    assert float(state["loss_scale"]) == 2.0**15

    _, m = step(state, batch)
    step32, state32 = setup()
    _, m32 = jax.jit(step32, compiler_options=FAST)(state32, batch)
    assert bool(m["finite"]) and float(m["grad_norm"]) == pytest.approx(float(m32["grad_norm"]), rel=2e-2)

    huge = {**state, "loss_scale": jnp.float32(2.0**40)}  # scaled fp16 gradients overflow
    new, m = step(huge, batch)
    assert bool(m["overflow"]) and bool(m["loss_finite"]) and not bool(m["finite"])
    assert float(new["loss_scale"]) == 2.0**39 and int(new["nonfinite"]) == 1
    assert int(new["nonfinite_streak"]) == 0  # the scale search, not divergence
    assert max_diff(new["params"], state["params"]) == 0.0

    new, m = step(state, batch, jnp.float32(jnp.nan))  # a non-finite loss is divergence
    assert not bool(m["overflow"]) and int(new["nonfinite_streak"]) == 1


def _stacked_blocks(params):
    """Unrolled parameters with their blocks stacked [L, ...], as a scan_layers model stores them."""
    blocks = [params["blocks"][i] for i in range(CFG.num_layers)]
    return {**{k: v for k, v in params.items() if k != "blocks"}, "blocks": jax.tree.map(lambda *l: np.stack(l), *blocks)}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_sharded_step_equals_single_device_and_params_follow_the_rules(scan):
    """Eight devices (data x fsdp x tensor) against one; with ``scan`` the eight-device model
    stores its blocks stacked and runs them as one scan over sharded parameters."""
    assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
    batch = make_batch(8)
    legs = {"one": setup(sgd=True), "eight": setup(CFG.replace(scan_layers=scan), sgd=True)}
    results = {}
    for name, mesh in {
        "one": shd.make_mesh(None, devices=jax.devices()[:1]),
        "eight": shd.make_mesh("data=2,fsdp=2,tensor=2"),
    }.items():
        step, state = legs[name]
        p_sh = shd.param_shardings(state["params"], mesh)
        rep = shd.replicated(mesh)
        st_sh = {k: (p_sh if k == "params" else rep) for k in state}
        st_sh["opt_state"] = jax.tree.map(lambda _: rep, state["opt_state"])
        placed = jax.device_put(state, st_sh)
        fn = jax.jit(step, in_shardings=(st_sh, shd.batch_sharding(mesh)), out_shardings=(st_sh, rep))
        new, m = fn(placed, shd.global_batch(batch, mesh))
        results[name] = (new, m)
        if name == "eight":
            blocks = new["params"]["blocks"]
            first, second = (blocks, blocks) if scan else (blocks[0], blocks[1])
            lead = (None,) if scan else ()  # the stacked layer axis is not split
            q = first["attn"]["q"]["kernel"][...]
            assert q.sharding.spec == P(*lead, "fsdp", "tensor")
            assert q.addressable_shards[0].data.shape[-2:] == (CFG.d_model // 2, CFG.d_model // 2)
            o = first["attn"]["o"]["kernel"][...]
            assert o.sharding.spec == P(*lead, "tensor", "fsdp")
            w_out = second["ffn"]["w_out"]["kernel"][...]
            assert w_out.addressable_shards[0].data.shape[-2:] == (CFG.d_ff // 2, CFG.d_model // 2)
            emb = new["params"]["tok_embed"]["embedding"][...]
            assert emb.sharding.spec == P(None, "fsdp")  # 61 rows do not split over tensor=2
            ln = first["ln1"]["scale"][...]
            assert ln.sharding.spec == P()
    (a, ma), (b, mb) = results["one"], results["eight"]
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-5)
    expected = jax.device_get(a["params"])
    got = jax.device_get(b["params"])
    if scan:
        expected = _stacked_blocks(nnx.to_pure_dict(expected))
        got = nnx.to_pure_dict(got)
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    assert max_diff(expected, got) < 1e-5


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan_layers"])
def test_dropout_draws_in_the_train_step(scan):
    """The dropout streams (with scan_layers: one key per layer) are reseeded from the step's key:
    the same state gives the same loss, another seed other masks."""
    cfg = CFG.replace(dropout=0.1, scan_layers=scan)
    model = GPT(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, params, rest = split_model(model)
    opt, sched = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    step = jax.jit(make_train_step(graphdef, rest, opt, sched, lm_loss, dropout_tags=rng_tags(model)))
    batch = make_batch(4)
    losses = [float(step(init_state(params, opt, seed, "fp32"), batch)[1]["loss"]) for seed in (0, 0, 1)]
    assert np.isfinite(losses).all()
    assert losses[0] == losses[1] and abs(losses[0] - losses[2]) > 1e-4


def test_stacked_block_parameters_keep_the_layer_axis_unsplit():
    mesh = shd.make_mesh("data=2,fsdp=2,tensor=2")
    for prefix in ("", "model/"):  # also inside a larger module
        assert shd.spec_for(prefix + "blocks/attn/q/kernel", (2, 32, 32), mesh) == P(None, "fsdp", "tensor")
        assert shd.spec_for(prefix + "blocks/ffn/w_out/kernel", (2, 128, 32), mesh) == P(None, "tensor", "fsdp")
        assert shd.spec_for(prefix + "blocks/1/attn/q/kernel", (32, 32), mesh) == P("fsdp", "tensor")
        assert shd.spec_for(prefix + "blocks/ln1/scale", (2, 32), mesh) == P()


def test_mesh_spec_errors():
    with pytest.raises(ValueError, match="uses 4 devices but there are 8"):
        shd.parse_mesh_spec("data=2,tensor=2", 8)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        shd.parse_mesh_spec("model=8", 8)
    assert shd.parse_mesh_spec("data=-1,tensor=2", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert shd.parse_mesh_spec(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("batch,accum,expect", [(12, 1, 6), (12, 4, 3), (9, 1, 3), (11, 1, 1), (16, 2, 8), (16, 1, 8)])
def test_cpu_data_devices_split_every_micro_batch(batch, accum, expect):
    assert loop.cpu_data_devices(batch, accum, 8) == expect


def test_default_cpu_mesh_trains_on_the_devices_the_batch_splits_over(monkeypatch):
    """With the CPU split into a device per core by tfd_jax (runtime.AUTO_CPU_DEVICES) a batch of 12
    trains on 6 of 8 devices; a device count the user chose, or a mesh they gave, must divide it."""
    cfg = TrainConfig(batch_size=12)
    monkeypatch.setattr(runtime, "AUTO_CPU_DEVICES", None)
    with pytest.raises(TrainingError, match="--batch-size 12 must be a multiple of data x fsdp = 8"):
        loop._make_mesh(cfg)
    monkeypatch.setattr(runtime, "AUTO_CPU_DEVICES", 8)
    assert dict(loop._make_mesh(cfg).shape) == {"data": 6, "fsdp": 1, "tensor": 1}
    with pytest.raises(TrainingError, match="must be a multiple"):
        loop._make_mesh(TrainConfig(batch_size=12, mesh="data=8"))


def test_flat_update_needs_a_data_only_mesh_and_resumes_only_as_it_started():
    from tfd_jax.train.config import resume_changes
    from tfd_jax.train.optim import OptimConfig

    flat = TrainConfig(batch_size=8, mesh="data=4,fsdp=2", optim=OptimConfig(flat_update=True))
    with pytest.raises(TrainingError, match=r"flat_update .* not sharded: use it on a data-only mesh"):
        loop._make_mesh(flat)
    assert dict(loop._make_mesh(dataclasses.replace(flat, mesh="data=8")).shape)["data"] == 8
    run = {"train": TrainConfig().to_dict(), "model": {"logits_dtype": "float32"}}
    with pytest.raises(TrainingError, match=r"TrainConfig.optim.flat_update true \(the run has false\)"):
        resume_changes(run, TrainConfig(optim=OptimConfig(flat_update=True)))
    # how the same model is computed, as --attention: it may change
    assert resume_changes(run, TrainConfig(), {"logits_dtype": "bfloat16"}) == {
        "model.logits_dtype": ("float32", "bfloat16")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("mp") / "text.txt"
    path.write_text(" ".join(rng.choice(["spam", "eggs", "ham", "(", ")", "\n"], size=4000)))
    return str(path)


def test_two_processes_match_one(small_text, tmp_path):
    """Two CPU processes joined by jax.distributed (one device each) train exactly like one process
    with two devices."""
    common = [
        "-m", "tfd_jax.cli", "train", "--data", small_text, "--tokenizer", "char", "--preset", "tiny",
        "--model", "d_model=32", "--model", "num_heads=2", "--model", "num_layers=1", "--batch-size", "4",
        "--seq-len", "16", "--steps", "6", "--max-bytes", "0", "--log-every", "1", "--eval-every", "6",
        "--eval-batches", "1", "--ckpt-every", "6", "--samples", "0", "--no-progress",
    ]
    base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base_env["JAX_PLATFORMS"] = "cpu"
    one = subprocess.run(
        [sys.executable, *common, "--out", str(tmp_path / "one")],
        env=dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        capture_output=True, text=True, timeout=300,
    )
    assert one.returncode == 0, one.stdout + one.stderr
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, *common, "--out", str(tmp_path / "two")],
            env=dict(base_env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    a = [r["loss"] for r in read_metrics(tmp_path / "one")]
    b = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["model"]["num_layers"] == 1
