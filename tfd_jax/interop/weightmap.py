"""A declarative map between a Hugging Face checkpoint's tensors and an NNX model's parameters.

A family (GPT-2, Llama, BERT) describes its layout as a list of :class:`Entry`: one stored tensor
(its key and shape) and the parameter(s) it becomes, through a chain of transforms:

==================  ==========================================================================
transform           from the stored tensor to ours (and back when saving)
==================  ==========================================================================
(none)              the same array (GPT-2's ``Conv1D`` weights are ``[in, out]``, like ours)
``TRANSPOSE``       ``torch.nn.Linear`` weights are ``[out, in]``; our ``y = x @ kernel`` wants ``[in, out]``
``split(axis)``     one fused tensor into several parameters (GPT-2's ``c_attn`` holds Q, K, V)
``reshape(shape)``  the same numbers in another shape (a per-head layout, a squeezed axis)
==================  ==========================================================================

:func:`load` fills a model built with ``nnx.eval_shape`` (so nothing is randomly initialised,
and a large checkpoint is read one tensor at a time) and :func:`save` gives the stored tensors back.
Both check every shape and name every missing or unexpected key. The map and the model are checked
against each other before any tensor is read: a parameter the map does not fill, or fills with the
wrong shape, is a bug in the family module and raises ``AssertionError``.

``ParamPath``: a parameter's path in the model's state, e.g. ``("blocks", 0, "attn", "q", "kernel")``.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "TRANSPOSE",
    "Entry",
    "ParamPath",
    "Reshape",
    "Split",
    "Transform",
    "Transpose",
    "check_tied",
    "entry",
    "load",
    "load_options",
    "reshape",
    "save",
    "split",
]

ParamPath = tuple
Shape = tuple[int, ...]


# -- transforms -----------------------------------------------------------------------------------------


class Transform:
    """One step from the stored layout to ours. Works on lists of arrays, so a split can feed
    several parameters and later steps apply to each part."""

    def out_shapes(self, shapes: list[Shape]) -> list[Shape]:
        """The shapes :meth:`to_ours` produces from arrays of ``shapes``."""
        raise NotImplementedError

    def to_ours(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def to_hf(self, arrays: list[np.ndarray], in_shapes: list[Shape]) -> list[np.ndarray]:
        """The inverse of :meth:`to_ours`; ``in_shapes`` are the shapes :meth:`to_ours` started from."""
        raise NotImplementedError


@dataclass(frozen=True)
class Transpose(Transform):
    """Swap the two axes of a matrix: ``[out, in]`` (torch ``Linear``) <-> ``[in, out]`` (ours)."""

    def out_shapes(self, shapes):
        for s in shapes:
            if len(s) != 2:
                raise AssertionError(f"transpose needs a matrix, got shape {s}")
        return [(s[1], s[0]) for s in shapes]

    def to_ours(self, arrays):
        return [a.T for a in arrays]

    def to_hf(self, arrays, in_shapes):
        return [a.T for a in arrays]

    def __repr__(self):
        return "TRANSPOSE"


@dataclass(frozen=True)
class Split(Transform):
    """One array into ``parts`` along ``axis``: equal parts, or of ``sizes`` when given."""

    parts: int
    axis: int = -1
    sizes: tuple[int, ...] | None = None

    def _bounds(self, length: int) -> list[int]:
        sizes = self.sizes or (length // self.parts,) * self.parts
        if len(sizes) != self.parts or sum(sizes) != length:
            raise AssertionError(f"cannot split an axis of {length} into {self.sizes or self.parts} parts")
        return [int(b) for b in np.cumsum(sizes)[:-1]]

    def out_shapes(self, shapes):
        if len(shapes) != 1:
            raise AssertionError(f"split takes one array, got {len(shapes)}")
        (shape,) = shapes
        axis = self.axis % len(shape)
        edges = [0, *self._bounds(shape[axis]), shape[axis]]
        return [shape[:axis] + (hi - lo,) + shape[axis + 1:] for lo, hi in itertools.pairwise(edges)]

    def to_ours(self, arrays):
        (array,) = arrays
        return np.split(array, self._bounds(array.shape[self.axis]), axis=self.axis)

    def to_hf(self, arrays, in_shapes):
        return [np.concatenate(arrays, axis=self.axis)]


@dataclass(frozen=True)
class Reshape(Transform):
    """The same numbers, each array reshaped to ``shape``."""

    shape: Shape

    def out_shapes(self, shapes):
        for s in shapes:
            if int(np.prod(s)) != int(np.prod(self.shape)):
                raise AssertionError(f"cannot reshape {s} to {self.shape}")
        return [tuple(self.shape)] * len(shapes)

    def to_ours(self, arrays):
        return [a.reshape(self.shape) for a in arrays]

    def to_hf(self, arrays, in_shapes):
        return [a.reshape(s) for a, s in zip(arrays, in_shapes)]


TRANSPOSE = Transpose()


def split(parts: int, axis: int = -1, sizes: Sequence[int] | None = None) -> Split:
    """A :class:`Split` into ``parts`` (equal unless ``sizes``) along ``axis``."""
    return Split(parts, axis, None if sizes is None else tuple(int(s) for s in sizes))


def reshape(shape: Sequence[int]) -> Reshape:
    return Reshape(tuple(int(s) for s in shape))


# -- entries ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One stored tensor and the parameter(s) it becomes.

    Attributes:
      key: the key as the family names it (after its optional prefix is stripped).
      shape: the stored tensor's shape.
      targets: our parameter paths, one per array the transforms produce.
      transforms: applied in order when loading, undone in reverse when saving.
      optional: a name for the part of the model this tensor belongs to (``"pooler"``) when a
        checkpoint may lack it; those parameters then keep a fresh initialisation, with a warning.
        Empty: the tensor is required.
    """

    key: str
    shape: Shape
    targets: tuple[ParamPath, ...]
    transforms: tuple[Transform, ...] = ()
    optional: str = ""

    def stages(self) -> list[list[Shape]]:
        """The shapes before each transform and after the last: ``[[shape], ..., target shapes]``."""
        shapes = [[tuple(self.shape)]]
        for t in self.transforms:
            shapes.append(t.out_shapes(shapes[-1]))
        return shapes


def entry(
    key: str,
    shape: Sequence[int],
    targets: ParamPath | Sequence[ParamPath],
    *transforms: Transform,
    optional: str = "",
) -> Entry:
    """An :class:`Entry`; ``targets`` is one path (a tuple of names) or a list of paths."""
    if isinstance(targets, tuple):
        targets = [targets]
    return Entry(key, tuple(int(s) for s in shape), tuple(tuple(t) for t in targets), tuple(transforms), optional)


# -- loading -------------------------------------------------------------------------------------------------


def _shown(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _check_map(entries: Sequence[Entry], slots: Mapping[ParamPath, tuple[Shape, object]], what: str) -> None:
    """The map against the model's parameters (shapes only): each fed once, with its own shape."""
    fed: dict[ParamPath, str] = {}
    for e in entries:
        out = e.stages()[-1]
        if len(out) != len(e.targets):
            raise AssertionError(f"{e.key}: the transforms give {len(out)} arrays for {len(e.targets)} targets")
        for path, shape in zip(e.targets, out):
            if path not in slots:
                raise AssertionError(f"{e.key} targets {path}, which the {what} does not have")
            if tuple(slots[path][0]) != tuple(shape):
                raise AssertionError(f"{e.key} gives {path} shape {shape}, the {what} has {tuple(slots[path][0])}")
            if path in fed:
                raise AssertionError(f"{path} is fed by both {fed[path]} and {e.key}")
            fed[path] = e.key
    unfed = sorted(set(slots) - set(fed), key=str)
    if unfed:
        raise AssertionError(f"the weight map leaves parameters of the {what} unset: {unfed}")


def _abstract_leaf(var) -> tuple[Shape, object]:
    value = var.get_value() if hasattr(var, "get_value") else var
    return tuple(value.shape), value.dtype


def load(
    entries: Sequence[Entry],
    loaders: Mapping[str, Callable[[], np.ndarray]],
    build: Callable[[], nnx.Module],
    *,
    origin: str = "checkpoint",
    name: Callable[[str], str] = str,
    ignore: Callable[[str], bool] = lambda key: False,
    unexpected_hint: str = "the model has no such weights",
    shape_hint: str = "",
) -> nnx.Module:
    """The model ``build()`` would make, with its parameters read through ``entries``.

    ``build`` is only traced: the model is built with ``nnx.eval_shape`` and filled from
    ``loaders``. Its non-parameter state (dropout RNG keys) is computed under ``jit`` without
    running the parameter initialisers; only the parameters of optional entries the checkpoint
    lacks are initialised (by ``build``'s own initialisers, also under ``jit``).

    Args:
      entries: the family's weight map.
      loaders: key (as in ``entries``) -> a function returning that tensor as numpy.
      build: a zero-argument function returning the model (e.g. ``lambda: GPT(cfg, rngs=nnx.Rngs(0))``).
      origin: the source, for error messages.
      name: a key as the checkpoint stores it (with its prefix), for error messages.
      ignore: stored tensors that are not weights of ours (causal-mask buffers, tied copies).
      unexpected_hint: what to say after the list of unexpected keys.
      shape_hint: the config fields that fix the shapes, e.g. ``" (n_embd=768, n_inner=3072)"``.

    Raises:
      ValueError: a required tensor is missing, an optional part is only partly there, a tensor is
        unexpected, or one has the wrong shape (each named by its key).
    """
    wanted = {e.key: e for e in entries}
    missing = [e.key for e in entries if e.key not in loaders and not e.optional]
    if missing:
        raise ValueError(
            f"{origin}: {len(missing)} tensor(s) missing from the checkpoint: {_shown(name(k) for k in missing)}"
        )
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        if e.optional:
            groups.setdefault(e.optional, []).append(e)
    for what, group in groups.items():  # a part is all there or all absent, never half read
        lacking = [e.key for e in group if e.key not in loaders]
        if lacking and len(lacking) < len(group):
            raise ValueError(
                f"{origin}: the {what} is incomplete, {len(lacking)} tensor(s) missing: "
                f"{_shown(name(k) for k in lacking)}"
            )
    unexpected = sorted(k for k in loaders if k not in wanted and not ignore(k))
    if unexpected:
        raise ValueError(f"{origin}: unexpected tensor(s) {_shown(name(k) for k in unexpected)}; {unexpected_hint}")

    abstract = nnx.eval_shape(build)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    slots = dict(nnx.to_flat_state(abstract_params))
    _check_map(entries, {p: _abstract_leaf(v) for p, v in slots.items()}, type(abstract).__name__)

    values: dict[ParamPath, jax.Array] = {}
    absent: dict[str, list[Entry]] = {}
    for e in entries:
        if e.key not in loaders:
            absent.setdefault(e.optional, []).append(e)
            continue
        array = loaders[e.key]()
        if tuple(array.shape) != e.shape:
            raise ValueError(
                f"{origin}: {name(e.key)} has shape {tuple(array.shape)}, but config.json{shape_hint} says {e.shape}"
            )
        parts = [array]
        for t in e.transforms:
            parts = t.to_ours(parts)
        for path, part in zip(e.targets, parts):
            values[path] = jnp.asarray(part, dtype=slots[path].get_value().dtype)
        del array, parts

    if absent:
        fresh_paths = [p for group in absent.values() for e in group for p in e.targets]
        fresh = jax.jit(lambda: _select(nnx.state(build(), nnx.Param), fresh_paths))()
        values.update(fresh)
        parts = "; no ".join(f"{what} ({_shown((name(e.key) for e in group), 3)})" for what, group in absent.items())
        warnings.warn(f"{origin} has no {parts}: those parameters keep a fresh random initialisation", stacklevel=3)

    params = nnx.from_flat_state([(path, slots[path].replace(value=values[path])) for path in slots])
    if jax.tree.leaves(abstract_rest):
        rest = jax.jit(lambda: nnx.state(build(), nnx.Not(nnx.Param)))()
    else:
        rest = abstract_rest
    return nnx.merge(graphdef, params, rest)


def _select(state: nnx.State, paths: list[ParamPath]) -> dict[ParamPath, jax.Array]:
    flat = dict(nnx.to_flat_state(state))
    return {p: flat[p].get_value() for p in paths}


# -- saving -----------------------------------------------------------------------------------------------------


def save(entries: Sequence[Entry], model: nnx.Module) -> dict[str, np.ndarray]:
    """The stored tensors (key as in ``entries`` -> numpy array, parameter dtype) for ``model``.

    Every entry must find its parameters in the model and every parameter must be written by some
    entry (``AssertionError`` otherwise: the family built the wrong map for this model).
    """
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    _check_map(entries, {p: (tuple(v.shape), v.dtype) for p, v in flat.items()}, type(model).__name__)
    tensors: dict[str, np.ndarray] = {}
    for e in entries:
        stages = e.stages()
        arrays = [np.asarray(jax.device_get(flat[path])) for path in e.targets]
        for t, in_shapes in zip(reversed(e.transforms), reversed(stages[:-1])):
            arrays = t.to_hf(arrays, in_shapes)
        (array,) = arrays
        if tuple(array.shape) != e.shape:
            raise AssertionError(f"{e.key}: expected {e.shape}, got {array.shape}")
        tensors[e.key] = array
    return tensors


def check_tied(
    loaders: Mapping[str, Callable[[], np.ndarray]],
    copy_key: str,
    key: str,
    *,
    origin: str,
    name: Callable[[str], str] = str,
    why: str,
) -> None:
    """A stored ``copy_key`` (an output head tied to ``key``) must equal ``key``'s tensor.

    Absent ``copy_key`` (or ``key``) passes: ``save_pretrained`` leaves tied copies out.

    Raises:
      ValueError: they differ; the message gives the shapes or the largest difference, then ``why``.
    """
    if copy_key not in loaders or key not in loaders:
        return
    copy, original = loaders[copy_key](), loaders[key]()
    if copy.shape == original.shape and np.array_equal(copy, original):
        return
    detail = (
        f"shape {copy.shape} vs {original.shape}"
        if copy.shape != original.shape
        else f"max abs difference {float(np.max(np.abs(copy.astype(np.float32) - original.astype(np.float32)))):.3g}"
    )
    raise ValueError(f"{origin}: {name(copy_key)} differs from {name(key)} ({detail}). {why}")


def load_options(loader: str, overrides: dict, allowed, also: Sequence[str] = ()) -> bool:
    """Check the keyword overrides a family's ``load_hf_*`` was given, and take ``scan_layers`` out
    of them (the model is filled block by block and stacked at the end). Returns ``scan_layers``.

    Raises ``TypeError`` naming the options the checkpoint fixes, ``ValueError`` for a non-bool
    ``scan_layers``."""
    bad = set(overrides) - set(allowed)
    if bad:
        raise TypeError(
            f"{loader} got unexpected option(s) {sorted(bad)}; the checkpoint fixes the model's shape, "
            f"only {sorted(allowed) + list(also)} may be set"
        )
    scan_layers = overrides.pop("scan_layers", False)
    if not isinstance(scan_layers, bool):
        raise ValueError(f"scan_layers must be True or False, got {scan_layers!r}")
    return scan_layers
