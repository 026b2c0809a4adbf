"""Device mesh and partition rules: data, fully-sharded (fsdp) and tensor parallelism.

The mesh has three named axes, ``("data", "fsdp", "tensor")``. Batches are split over
``data`` x ``fsdp``; parameters are split over ``fsdp`` (ZeRO-3 style: each device holds a slice and
XLA gathers it when needed) and ``tensor`` (Megatron style: attention heads and FFN columns split,
the matching output projection split by rows). ``jit`` inserts the communication (GSPMD).

Multi-host: call :func:`maybe_initialize_distributed` first; every process then builds the same
global mesh over all devices and feeds only its own slice of each batch.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the parameter path, spec per dimension). First match wins; no match = replicated.
# Paths look like "blocks/3/attn/q/kernel"; a scan_layers model stores "blocks/attn/q/kernel" with a
# leading layer axis [L, ...], which stays unsplit (see spec_for).
PARTITION_RULES: list[tuple[str, tuple]] = [
    (r"tok_embed/embedding$", ("tensor", "fsdp")),  # [V, M]
    (r"pos_embed/embedding$", (None, "fsdp")),  # [T, M]
    (r"attn/(q|k|v)/kernel$", ("fsdp", "tensor")),  # [M, M]: heads split over tensor
    (r"attn/(q|k|v)/bias$", ("tensor",)),
    (r"attn/o/kernel$", ("tensor", "fsdp")),  # rows = heads
    (r"ffn/(w_in|w_gate)/kernel$", ("fsdp", "tensor")),  # [M, F]
    (r"ffn/w_in/bias$", ("tensor",)),
    (r"ffn/w_out/kernel$", ("tensor", "fsdp")),  # [F, M]
    (r"lm_head/kernel$", ("fsdp", "tensor")),  # [M, V]
    (r"lm_head/bias$", ("tensor",)),
]


#: Paths of stacked block parameters (``GPTConfig.scan_layers``): "blocks/" not followed by an index.
_STACKED = re.compile(r"(?:^|/)blocks/(?!\d+/)")


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> sizes. Unnamed axes are 1; by default everything goes to ``data``.

    A size of ``-1`` takes whatever devices are left.
    """
    sizes = {a: 1 for a in AXES}
    if not spec:
        sizes["data"] = num_devices
        return sizes
    fill = None
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"bad --mesh part {part!r}; write e.g. data=2,fsdp=2,tensor=2")
        name, value = (s.strip() for s in part.split("=", 1))
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r}; the axes are {', '.join(AXES)}")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name} needs an integer size, got {value!r}") from None
        if n == -1:
            fill = name
            continue
        if n < 1:
            raise ValueError(f"mesh axis {name} must be >= 1 (or -1 for the rest), got {n}")
        sizes[name] = n
    used = int(np.prod(list(sizes.values())))
    if fill is not None:
        if num_devices % used:
            raise ValueError(f"cannot fill axis {fill}: {num_devices} devices are not divisible by {used}")
        sizes[fill] = num_devices // used
    total = int(np.prod(list(sizes.values())))
    if total != num_devices:
        raise ValueError(
            f"--mesh {spec!r} uses {total} devices but there are {num_devices}; "
            "the product of the axis sizes must equal the device count"
        )
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")`` over all (or the given) devices."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def path_name(path) -> str:
    """A pytree key path as ``"blocks/0/attn/q/kernel"`` (NNX's trailing ``value`` dropped)."""
    parts = []
    for k in path:
        k = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(k))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh, rules=PARTITION_RULES) -> P:
    """The PartitionSpec for one parameter. A dimension whose size the mesh axis does not divide
    is left unsplit (e.g. GPT-2's vocabulary of 50,257 over 2 tensor shards)."""
    for pattern, dims in rules:
        if re.search(pattern, name):
            if _STACKED.search(name) and len(shape) == len(dims) + 1:
                dims = (None, *dims)  # every layer's slice split the same way
            if len(dims) != len(shape):
                break
            out = []
            for axis, size in zip(dims, shape):
                out.append(axis if axis is None or size % mesh.shape[axis] == 0 else None)
            return P(*out)
    return P()


def param_shardings(params, mesh: Mesh, rules=PARTITION_RULES):
    """A pytree of ``NamedSharding`` matching ``params`` (arrays or ``ShapeDtypeStruct``s)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_name(path), tuple(x.shape), mesh, rules)), params
    )


def batch_sharding(mesh: Mesh, ndim: int = 2, *, steps: bool = False) -> NamedSharding:
    """Batches ``[B, T, ...]`` split over ``data`` x ``fsdp`` on the batch axis (``ndim=1``: a spec
    that fits batch arrays of any rank, e.g. for a batch dict holding ``[B]`` and ``[B, T]`` arrays).
    ``steps=True``: several steps' batches stacked, ``[steps, B, T, ...]``, split on the second axis."""
    lead = (None,) if steps else ()
    return NamedSharding(mesh, P(*lead, BATCH_AXES, *([None] * (ndim - 1 - len(lead)))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, *, steps: bool = False) -> dict[str, jax.Array]:
    """Assemble each process's slice of a batch into global arrays sharded over the batch axes
    (``steps=True``: batches stacked ``[steps, B, ...]``, see :func:`batch_sharding`)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), steps=steps), np.asarray(v))
        for k, v in local.items()
    }


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment describes a multi-process job.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (set by hand or
    a launcher), and the cluster environments JAX detects itself (SLURM, Cloud TPU pods, ...) when
    ``TFD_DISTRIBUTED=1``. Returns True if it initialised. Safe to call more than once.
    """
    if jax.distributed.is_initialized():
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and os.environ.get("JAX_NUM_PROCESSES"):
        # Asking for the backend here would start JAX before initialize(); read the environment instead.
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ.get("JAX_PROCESS_ID", "0")),
        )
        return True
    if os.environ.get("TFD_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False
