"""Folding batch norm into the layer before it (Ioffe & Szegedy 2015, Algorithm 2).

At inference batch norm is a fixed affine map per feature,
``y = (z - mean) / sqrt(var + eps) * gamma + beta``. When ``z = x @ W + b`` (a
Dense layer, or a convolution: linear in its kernel, one output channel per
last kernel axis), the map can be moved into the layer:

    W' = W * gamma / sqrt(var + eps)          (per output feature)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta

and the batch norm disappears from the deployed model. Both lines are
:func:`jaxnorm.normalize`, the one implementation of the eval-mode map that
:func:`jaxnorm.batch_norm` also evaluates with: ``b'`` is ``normalize`` of
the old bias, ``W'`` is ``normalize`` of the kernel with a zero mean and no
beta. No formula is written here a second time.

:func:`fold_batch_norms` applies :func:`fold_batch_norm` to pairs of layers in
a nested variable tree (flax linen's ``{"params": ..., "batch_stats": ...}``);
it needs no flax, and :func:`jaxnorm.linen.fold_batch_norms` re-exports it next
to the pair detection (:mod:`jaxnorm._linen.folding`), which does.

Formerly ``jaxnorm/_src/inference.py``; recalibration (PreciseBN), the other
inference-time tool, is :mod:`jaxnorm._src.recalibration`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src.checks import check_collection, check_epsilon, check_floating
from jaxnorm._src.moments import accumulation_dtype
from jaxnorm._src.normalize import normalize
from jaxnorm._src.state import BatchStats

Array = jax.Array


# --- checks with folding as their only caller ---------------------------------

def check_stats(fn: str, stats: Any) -> Any:
    """Returns ``stats``; raises unless it has ``mean`` and ``var`` (a BatchStats or a mapping)."""
    if isinstance(stats, Mapping):
        if "mean" in stats and "var" in stats:
            return stats
    elif hasattr(stats, "mean") and hasattr(stats, "var"):
        return stats
    raise ValueError(
        f"{fn}: `stats` must be a jn.BatchStats or a mapping with 'mean' and 'var', got "
        f"{type(stats).__name__}; pass the batch norm's running statistics, e.g. "
        f"`variables['batch_stats']['BatchNorm_0']`."
    )


def check_feature_axis(fn: str, feature_axis: Any, kernel_shape: tuple[int, ...]) -> int:
    """Returns ``feature_axis`` as a non-negative axis of the kernel; raises when it is not one."""
    ndim = len(kernel_shape)
    if ndim == 0:
        raise ValueError(
            f"{fn}: `kernel` must have at least one axis (the output features), got a "
            f"scalar; pass the layer's kernel, e.g. (in, out) for Dense or (H, W, in, out) for Conv."
        )
    if (
        isinstance(feature_axis, bool)
        or not isinstance(feature_axis, (int, np.integer))
        or not -ndim <= feature_axis < ndim
    ):
        raise ValueError(
            f"{fn}: `feature_axis`={feature_axis!r} is not an axis of `kernel` (shape "
            f"{tuple(kernel_shape)}); pass an int in [{-ndim}, {ndim - 1}]: -1 for flax's "
            f"Dense (in, out) and Conv (H, W, in, out), 0 for PyTorch's (out, in, ...)."
        )
    return int(feature_axis) % ndim


def check_vector(
    fn: str, name: str, value: Any, features: int, kernel_shape: tuple[int, ...], feature_axis: Any
) -> Any:
    """Returns ``value``; raises unless it is None or a floating vector of the layer's ``features`` outputs."""
    if value is None:
        return None
    shape = tuple(np.shape(value))
    if shape != (features,):
        raise ValueError(
            f"{fn}: `{name}` has shape {shape}, but `kernel` (shape {tuple(kernel_shape)}) has "
            f"{features} output features along `feature_axis`={feature_axis!r}; pass a "
            f"({features},) array, or the `feature_axis` of the kernel's output features."
        )
    return check_floating(fn, value, name)


def check_pair(fn: str, item: tuple[Any, ...]) -> tuple[Any, ...]:
    """Returns one entry of ``pairs``; raises unless it is (layer_path, bn_path) or (layer_path, bn_path, epsilon)."""
    if len(item) not in (2, 3):
        raise ValueError(
            f"{fn}: each entry of `pairs` must be (layer_path, bn_path) or (layer_path, "
            f"bn_path, epsilon), got {item!r}; e.g. `[('Conv_0', 'BatchNorm_0')]` or "
            f"`{{'Conv_0': 'BatchNorm_0'}}`."
        )
    return item


def check_pairs_unique(fn: str, pairs: Sequence[tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
    """A layer takes one batch norm and a batch norm follows one layer."""
    for idx, role in ((0, "layer"), (1, "batch norm")):
        seen = [p[idx] for p in pairs]
        twice = sorted({"/".join(p) for p in seen if seen.count(p) > 1})
        if twice:
            raise ValueError(
                f"{fn}: `pairs` names the {role} {', '.join(twice)} more than once; each "
                f"Dense/Conv folds the one batch norm its output goes into."
            )


def check_paths(fn: str, layer_path: tuple[str, ...], layer: Any, bn_path: tuple[str, ...], bn_stats: Any) -> None:
    """The layer must hold a ``kernel`` in ``params`` and the batch norm ``mean``/``var`` in ``batch_stats``."""
    if layer is None or "kernel" not in layer:
        raise ValueError(
            f"{fn}: `pairs` names the layer {'/'.join(layer_path)!r}, but `variables['params']` "
            f"has no Dense/Conv `kernel` there; give the path of the layer's module, e.g. "
            f"'Block_0/Conv_0' (see `jaxnorm.linen.batch_norm_pairs`)."
        )
    if bn_stats is None or "mean" not in bn_stats or "var" not in bn_stats:
        raise ValueError(
            f"{fn}: `pairs` names the batch norm {'/'.join(bn_path)!r}, but "
            f"`variables['batch_stats']` has no 'mean' and 'var' there; give the path of "
            f"the BatchNorm module, e.g. 'Block_0/BatchNorm_0'."
        )


# --- folding -------------------------------------------------------------------


def _stats_fields(fn: str, stats: Any) -> tuple[Any, Any]:
    """``(mean, var)`` of a BatchStats, any object with those attributes, or a mapping."""
    check_stats(fn, stats)
    if isinstance(stats, Mapping):
        return stats["mean"], stats["var"]
    return stats.mean, stats.var


def fold_batch_norm(
    kernel: Array,
    bias: Array | None,
    stats: BatchStats,
    scale: Array | None = None,
    bn_bias: Array | None = None,
    *,
    epsilon: float = 1e-5,
    feature_axis: int = -1,
) -> tuple[Array, Array]:
    """Folds an eval-mode batch norm into the Dense or Conv layer before it.

    ``layer'(x) == batch_norm(layer(x), stats, scale, bn_bias, training=False)``
    for a layer linear in its kernel plus a per-feature bias (Ioffe & Szegedy
    2015, Algorithm 2: inference batch norm is an affine map per feature).

    Shapes: C the layer's output features. flax's Dense kernel is ``(in, C)``,
    flax's Conv kernel ``(..., in, C)`` (HWIO): both have C last, the default
    ``feature_axis=-1``. PyTorch's ``Linear.weight`` ``(C, in)`` and
    ``Conv2d.weight`` ``(C, in, kH, kW)`` use ``feature_axis=0``.

    Arithmetic runs in at least float32 (float64 for float64 inputs); the new
    kernel has the kernel's dtype and the new bias the old bias's dtype (the
    kernel's when ``bias`` is None).

    Args:
      kernel: the layer's kernel, any rank, C along ``feature_axis``.
      bias: the layer's (C,) bias, or None for a bias-free layer (the folded
        layer needs one: the result has a bias either way).
      stats: :class:`BatchStats` (or a ``{"mean", "var", ...}`` mapping, as in
        linen's ``batch_stats``) with (C,) ``mean`` and ``var``.
      scale, bn_bias: the batch norm's (C,) gamma and beta, None when absent.
      epsilon: the batch norm's epsilon.
      feature_axis: the kernel axis of the output features.

    Returns:
      ``(kernel, bias)``: the folded kernel (kernel's shape and dtype) and (C,) bias.

    Raises:
      ValueError: non-floating arrays, a bad ``feature_axis``, or shapes of
        ``bias``, ``stats``, ``scale``, ``bn_bias`` that are not (C,).

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> x = jax.random.normal(jax.random.key(0), (5, 3))
      >>> w = jax.random.normal(jax.random.key(1), (3, 4))
      >>> stats = jn.BatchStats(jnp.arange(4.0), jnp.full(4, 2.0), jnp.asarray(7))
      >>> y, _ = jn.batch_norm(x @ w, stats, jnp.full(4, 0.5), jnp.ones(4), training=False)
      >>> w2, b2 = jn.fold_batch_norm(w, None, stats, jnp.full(4, 0.5), jnp.ones(4))
      >>> bool(jnp.allclose(x @ w2 + b2, y, atol=1e-5))
      True
    """
    fn = "fold_batch_norm"
    check_epsilon(fn, epsilon)
    mean, var = _stats_fields(fn, stats)
    check_floating(fn, kernel, "kernel")
    kernel = jnp.asarray(kernel)
    axis = check_feature_axis(fn, feature_axis, kernel.shape)
    c = kernel.shape[axis]
    named = {"bias": bias, "stats.mean": mean, "stats.var": var, "scale": scale, "bn_bias": bn_bias}
    for name, value in named.items():
        check_vector(fn, name, value, c, kernel.shape, feature_axis)
    acc = accumulation_dtype(jnp.result_type(*(v for v in (kernel, *named.values()) if v is not None)))
    cast = lambda v: None if v is None else jnp.asarray(v, acc)  # noqa: E731
    mean, var, scale, bn_bias = cast(mean), cast(var), cast(scale), cast(bn_bias)
    # W' = normalize(W) with zero mean and no beta: W * gamma / sqrt(var + eps) per feature.
    along = tuple(c if a == axis else 1 for a in range(kernel.ndim))
    shaped = lambda v: None if v is None else jnp.reshape(v, along)  # noqa: E731
    new_kernel = normalize(
        kernel.astype(acc),
        jnp.zeros((), acc),
        shaped(var),
        shaped(scale),
        None,
        epsilon=epsilon,
        dtype=kernel.dtype,
    )
    # b' = normalize(b): (b - mean) * gamma / sqrt(var + eps) + beta.
    bias_dtype = kernel.dtype if bias is None else jnp.result_type(bias)
    old_bias = jnp.zeros((c,), acc) if bias is None else cast(bias)
    new_bias = normalize(old_bias, mean, var, scale, bn_bias, epsilon=epsilon, dtype=bias_dtype)
    return new_kernel, new_bias


class FoldPair(NamedTuple):
    """A layer (Dense or Conv) whose output goes straight into a batch norm.

    Attributes:
      layer: path of the layer in the variable tree, e.g. ``("Block_0", "Conv_0")``.
      batch_norm: path of the batch norm, e.g. ``("Block_0", "BatchNorm_0")``.
      epsilon: the batch norm's epsilon.

    Example:
      >>> import jaxnorm as jn
      >>> jn.FoldPair(("Conv_0",), ("BatchNorm_0",), 1e-3).epsilon
      0.001
    """

    layer: tuple[str, ...]
    batch_norm: tuple[str, ...]
    epsilon: float = 1e-5


def _path(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(p for p in value.split("/") if p)
    return tuple(str(p) for p in value)


def _as_pairs(fn: str, pairs: Any, epsilon: float) -> list[FoldPair]:
    """Accepts a mapping ``{layer: bn}`` or an iterable of ``(layer, bn[, epsilon])``."""
    items: Iterable[Any] = pairs.items() if isinstance(pairs, Mapping) else pairs
    out = []
    for item in items:
        item = tuple(item)
        check_pair(fn, item)
        eps = float(item[2]) if len(item) == 3 else epsilon
        out.append(FoldPair(_path(item[0]), _path(item[1]), eps))
    return out


def _plain(tree: Any) -> Any:
    """Nested mappings (FrozenDict included) as plain dicts, leaves untouched."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _get(tree: dict[str, Any], collection: str, path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = tree.get(collection)
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, dict) else None


def _remove(tree: dict[str, Any], path: tuple[str, ...]) -> None:
    """Deletes ``path`` and then every parent left empty."""
    if not path or path[0] not in tree:
        return
    if len(path) == 1:
        del tree[path[0]]
        return
    child = tree[path[0]]
    if isinstance(child, dict):
        _remove(child, path[1:])
        if not child:
            del tree[path[0]]


def fold_batch_norms(variables: Mapping[str, Any], pairs: Any, *, epsilon: float = 1e-5) -> dict[str, Any]:
    """Folds each batch norm of ``pairs`` into its layer, in a linen variable tree.

    For every pair, ``params/<layer>/{kernel,bias}`` become the folded ones
    (:func:`fold_batch_norm`; a layer without bias gets one) and the batch
    norm's ``params`` and ``batch_stats`` entries are removed, with any module
    left empty. The result holds the variables of the same model built without
    those batch norms, whose layers have ``use_bias=True``: give the model a
    field such as ``use_bn: bool = True`` that, when False, skips the batch
    norm and turns the layer's bias on (see the README's "Inference and PyTorch
    interop"). Layers keep their names when every batch norm of a model is
    folded; when only some are, name the modules explicitly, since flax's
    automatic names (``BatchNorm_1``) count the modules that are built.

    Supported: a Dense or Conv (kernel with the output features last, as
    flax's ``Dense``, ``Conv``, ``ConvTranspose``) whose output goes straight
    into a jaxnorm (or flax) BatchNorm over the last axis, nothing in between.
    :func:`jaxnorm.linen.batch_norm_pairs` finds such pairs in a model and
    refuses the rest (batch norm before the layer, another feature axis, a
    layer whose output is also used elsewhere).

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` (dicts or FrozenDicts).
      pairs: ``{layer_path: bn_path}``, or an iterable of ``(layer_path,
        bn_path)`` or ``(layer_path, bn_path, epsilon)`` (e.g. the
        :class:`FoldPair` list that :func:`jaxnorm.linen.batch_norm_pairs`
        returns); a path is a tuple of module names or a ``"Block_0/Conv_0"``
        string.
      epsilon: the batch norms' epsilon, for pairs that do not give their own.

    Returns:
      A new dict of variables (plain dicts); ``batch_stats`` is dropped when
      nothing is left in it.

    Raises:
      ValueError: a path that is missing or is not a layer with a ``kernel``
        (or a batch norm with ``mean`` and ``var``), a layer or batch norm named
        twice, and the shape errors of :func:`fold_batch_norm`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm as jn
      >>> variables = {
      ...     "params": {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
      ...                "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.zeros(2)}},
      ...     "batch_stats": {"BatchNorm_0": {"mean": jnp.ones(2), "var": jnp.full(2, 4.0),
      ...                                     "count": jnp.asarray(3)}}}
      >>> folded = jn.fold_batch_norms(variables, {"Dense_0": "BatchNorm_0"}, epsilon=0.0)
      >>> sorted(folded), folded["params"]["Dense_0"]["bias"].tolist()
      (['params'], [-0.5, -0.5])
    """
    fn = "fold_batch_norms"
    check_collection(fn, variables, "params")
    out = _plain(variables)
    todo = _as_pairs(fn, pairs, epsilon)
    check_pairs_unique(fn, [(p.layer, p.batch_norm) for p in todo])
    for pair in todo:
        layer = _get(out, "params", pair.layer)
        bn_params = _get(out, "params", pair.batch_norm) or {}
        bn_stats = _get(out, "batch_stats", pair.batch_norm)
        check_paths(fn, pair.layer, layer, pair.batch_norm, bn_stats)
        kernel, bias = fold_batch_norm(
            layer["kernel"],
            layer.get("bias"),
            bn_stats,
            bn_params.get("scale"),
            bn_params.get("bias"),
            epsilon=pair.epsilon,
        )
        layer["kernel"], layer["bias"] = kernel, bias
        _remove(out["params"], pair.batch_norm)
        _remove(out["batch_stats"], pair.batch_norm)
    if "batch_stats" in out and not out["batch_stats"]:
        del out["batch_stats"]
    return out
