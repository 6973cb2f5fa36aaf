"""The PyTorch state-dict converters behind :mod:`jaxnorm.interop`, whose docstring is their guide.

Arrays in, arrays out, no torch import: tensors are read through
``.detach().cpu().numpy()`` when they have it. The key mapping, the momentum
flip and the unbiased running variance are documented once, in
:mod:`jaxnorm.interop`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src.state import BatchStats

_INT32_MAX = np.iinfo(np.int32).max


def raise_no_layer(fn: str, prefix: str, wanted: Sequence[str], n_keys: int, layers: Sequence[str]) -> None:
    """Always raises: no entry of the layer under ``prefix`` in a PyTorch state dict."""
    hint = f" (layers that have them: {', '.join(repr(x) for x in layers[:6])})" if layers else ""
    example = layers[0] if layers else "bn1"
    raise ValueError(
        f"{fn}: `state_dict` ({n_keys} keys) has none of {', '.join(wanted)} under "
        f"`prefix`={prefix!r}{hint}; pass the layer's name as `prefix=`, e.g. `prefix={example!r}`."
    )


def raise_running_stats(fn: str, prefix: str) -> None:
    """Always raises: a per-example norm (PyTorch InstanceNorm, track_running_stats=True) with running statistics."""
    raise ValueError(
        f"{fn}: the layer under `prefix`={prefix!r} keeps running statistics "
        f"(track_running_stats=True), which a per-example norm does not use; in eval mode "
        f"such a layer is batch norm over its channels: convert it with "
        f"`batch_norm_from_torch` and use `jn.batch_norm(..., axis=1)`."
    )


def check_momentum(fn: str, momentum: Any) -> float:
    """Returns a batch-norm momentum in [0, 1]; None (PyTorch's cumulative average) has no counterpart."""
    if momentum is None:
        raise ValueError(
            f"{fn}: `momentum`=None is PyTorch's cumulative average, which has no "
            f"momentum; pass `average='cumulative'` to jn.batch_norm instead."
        )
    if hasattr(momentum, "detach") or isinstance(momentum, (np.ndarray, jax.Array)):
        value = to_numpy(momentum)  # a 0-d torch tensor, NumPy or JAX array
        if value.ndim == 0 and (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            momentum = value.item()
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float, np.floating, np.integer))
        or not 0.0 <= float(momentum) <= 1.0
    ):
        raise ValueError(f"{fn}: `momentum`={momentum!r} must be a number in [0, 1], e.g. `momentum=0.1`.")
    return float(momentum)


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy copy of an array-like; a torch tensor goes through ``.detach().cpu().numpy()``."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: go through float32
            value = value.float()
        value = value.numpy()
    return np.array(value)


def _prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _layer_keys(fn: str, state_dict: Mapping[str, Any], prefix: str, known: tuple[str, ...]) -> dict[str, Any]:
    """The entries of one layer under ``prefix``, by their short names; raises when there is none."""
    p = _prefix(prefix)
    found = {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p) and k[len(p) :] in known}
    if not found:
        layers = sorted({k.rsplit(".", 1)[0] for k in state_dict if "." in k and k.rsplit(".", 1)[1] in known})
        raise_no_layer(fn, prefix, [p + k for k in known], len(state_dict), layers)
    return found


def _as_tensors(out: dict[str, np.ndarray], as_tensor: Callable[[np.ndarray], Any] | None) -> dict[str, Any]:
    return out if as_tensor is None else {k: as_tensor(v) for k, v in out.items()}


def _affine_params(found: Mapping[str, Any]) -> dict[str, Any]:
    params = {}
    if "weight" in found:
        params["scale"] = jnp.asarray(to_numpy(found["weight"]))
    if "bias" in found:
        params["bias"] = jnp.asarray(to_numpy(found["bias"]))
    return params


def _affine_to_torch(params: Mapping[str, Any] | None, prefix: str) -> dict[str, np.ndarray]:
    p = _prefix(prefix)
    params = {} if params is None else params
    out = {}
    if params.get("scale") is not None:
        out[p + "weight"] = np.array(params["scale"])
    if params.get("bias") is not None:
        out[p + "bias"] = np.array(params["bias"])
    return out


def _check_pair(fn: str, found: Mapping[str, Any], prefix: str, a: str, b: str, note: str) -> None:
    """Raises when exactly one of the entries ``a`` and ``b`` is in the layer's state dict."""
    if (a in found) != (b in found):
        have, missing = (a, b) if a in found else (b, a)
        p = _prefix(prefix)
        raise ValueError(
            f"{fn}: `state_dict` has `{p}{have}` but is missing `{p}{missing}`; PyTorch writes both "
            f"({note}): pass the layer's full `module.state_dict()`."
        )


def _stats_field(stats: Any, name: str) -> Any:
    return stats[name] if isinstance(stats, Mapping) else getattr(stats, name)


def _stats_node(fn: str, stats: Any) -> Any:
    """``stats`` as a BatchStats or a mapping with ``mean`` and ``var``; a plain 3-tuple becomes BatchStats."""
    if isinstance(stats, BatchStats) or (isinstance(stats, Mapping) and {"mean", "var"} <= set(stats)):
        return stats
    if type(stats) in (tuple, list) and len(stats) == 3:
        return BatchStats(*stats)
    got = sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__
    raise ValueError(
        f"{fn}: `stats` must be a BatchStats, a mapping with 'mean' and 'var' (and optionally 'count') or a "
        f"tuple (mean, var, count); got {got}. Pass e.g. `variables['batch_stats']['BatchNorm_0']`."
    )


def batch_norm_from_torch(
    state_dict: Mapping[str, Any], *, prefix: str = ""
) -> tuple[dict[str, Any], BatchStats | None]:
    """Converts a ``torch.nn.BatchNorm1d/2d/3d`` state dict to jaxnorm's parameters and statistics.

    Args:
      state_dict: ``module.state_dict()`` of the batch norm, or of a whole model
        with ``prefix`` naming the layer; values are tensors or any array-likes.
      prefix: the layer's name in the state dict, e.g. ``"layer1.0.bn1"``.

    Returns:
      ``(params, stats)``: ``params`` is ``{"scale": (C,), "bias": (C,)}``, or
      ``{}`` for ``affine=False`` (pass ``scale=None, bias=None``, or a linen
      ``BatchNorm(use_scale=False, use_bias=False)``); ``stats`` a
      :class:`jaxnorm.BatchStats` (float32 mean and var, int32 count from
      ``num_batches_tracked``, 0 when absent, saturating at the int32 maximum),
      or ``None`` for ``track_running_stats=False``: such a layer normalizes
      with batch statistics in evaluation too, which is
      ``jn.batch_norm(x, jn.init_batch_stats(C), ..., training=True)`` with the
      new statistics thrown away.

    Raises:
      ValueError: no batch-norm entries under ``prefix``.

    Example:
      >>> import numpy as np, jaxnorm.interop as ji
      >>> sd = {"bn.weight": np.ones(3), "bn.bias": np.zeros(3), "bn.running_mean": np.zeros(3),
      ...       "bn.running_var": np.ones(3), "bn.num_batches_tracked": np.array(5)}
      >>> params, stats = ji.batch_norm_from_torch(sd, prefix="bn")
      >>> sorted(params), int(stats.count), stats.mean.dtype
      (['bias', 'scale'], 5, dtype('float32'))
    """
    fn = "batch_norm_from_torch"
    found = _layer_keys(
        fn, state_dict, prefix, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    )
    _check_pair(fn, found, prefix, "weight", "bias", "an affine=False layer has neither")
    params = _affine_params(found)
    _check_pair(fn, found, prefix, "running_mean", "running_var", "a track_running_stats=False layer has neither")
    if "running_mean" not in found:
        if "num_batches_tracked" in found:
            raise ValueError(
                f"{fn}: `state_dict` has `{_prefix(prefix)}num_batches_tracked` but no running_mean/running_var "
                "under that prefix; pass the full state dict of the layer (`module.state_dict()`)."
            )
        return params, None
    mean = jnp.asarray(to_numpy(found["running_mean"]), jnp.float32)
    var = jnp.asarray(to_numpy(found["running_var"]), jnp.float32)
    tracked = to_numpy(found["num_batches_tracked"]) if "num_batches_tracked" in found else np.array(0)
    if tracked.shape != () or not np.issubdtype(tracked.dtype, np.integer) or tracked < 0:
        raise ValueError(
            f"{fn}: `{_prefix(prefix)}num_batches_tracked`={tracked!r} must be a non-negative integer scalar "
            "(the batches PyTorch has folded in); pass the layer's own state dict entry."
        )
    count = jnp.asarray(np.minimum(tracked.astype(np.int64), _INT32_MAX), jnp.int32)
    return params, BatchStats(mean, var, count)


def batch_norm_to_torch(
    params: Mapping[str, Any] | None,
    stats: Any,
    *,
    prefix: str = "",
    as_tensor: Callable[[np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """jaxnorm batch-norm parameters and statistics as a ``torch.nn.BatchNorm*d`` state dict.

    Args:
      params: ``{"scale", "bias"}`` (either may be absent; None or ``{}`` for
        ``affine=False``), e.g. ``variables["params"]["BatchNorm_0"]``.
      stats: :class:`jaxnorm.BatchStats` or a ``{"mean", "var", "count"}``
        mapping, e.g. ``variables["batch_stats"]["BatchNorm_0"]``; None for a
        layer without running statistics (``track_running_stats=False``). A
        mapping without ``count`` (flax's own BatchNorm) writes
        ``num_batches_tracked=0``; a float count holding an integer (after
        ``lax.pmean``) is accepted.
      prefix: the layer's name, prepended to every key (``"bn1"`` gives ``"bn1.weight"``).
      as_tensor: applied to every array, e.g. ``torch.from_numpy``; default NumPy arrays.

    Returns:
      ``weight``, ``bias``, ``running_mean``, ``running_var`` (float32) and
      ``num_batches_tracked`` (int64 scalar), the ones that exist.

    Example:
      >>> import jaxnorm as jn, jaxnorm.interop as ji
      >>> sd = ji.batch_norm_to_torch({}, jn.init_batch_stats(3))
      >>> sorted(sd), sd["num_batches_tracked"].dtype
      (['num_batches_tracked', 'running_mean', 'running_var'], dtype('int64'))
    """
    out = _affine_to_torch(params, prefix)
    if stats is not None:
        stats = _stats_node("batch_norm_to_torch", stats)
        p = _prefix(prefix)
        out[p + "running_mean"] = np.array(_stats_field(stats, "mean"), np.float32)
        out[p + "running_var"] = np.array(_stats_field(stats, "var"), np.float32)
        has_count = isinstance(stats, BatchStats) or "count" in stats
        # flax's own BatchNorm keeps no count: PyTorch gets 0 (it only reads it for momentum=None).
        count = np.asarray(_stats_field(stats, "count")) if has_count else np.array(0)
        if count.shape != () or not np.isfinite(count) or count < 0 or count != np.round(count):
            raise ValueError(
                f"batch_norm_to_torch: `stats.count`={count!r} must be a non-negative integer scalar."
            )
        out[p + "num_batches_tracked"] = np.array(count, np.int64)
    return _as_tensors(out, as_tensor)


def momentum_from_torch(momentum: float) -> float:
    """PyTorch's batch-norm momentum (weight on the new value) as jaxnorm's (weight on the old).

    ``1 - momentum``: PyTorch's default 0.1 is 0.9 here. PyTorch's
    ``momentum=None`` (a cumulative average) is ``average="cumulative"``.

    Args:
      momentum: PyTorch's momentum, in [0, 1].

    Returns:
      jaxnorm's ``momentum``.

    Raises:
      ValueError: ``None`` (use ``average="cumulative"``) or a value outside [0, 1].

    Example:
      >>> import jaxnorm.interop as ji
      >>> ji.momentum_from_torch(0.1)
      0.9
    """
    return _flip("momentum_from_torch", momentum)


def momentum_to_torch(momentum: float) -> float:
    """jaxnorm's (and flax's) batch-norm momentum as PyTorch's: ``1 - momentum``.

    Args:
      momentum: jaxnorm's momentum (weight on the old value), in [0, 1].

    Returns:
      PyTorch's ``momentum`` (weight on the new value).

    Raises:
      ValueError: a value outside [0, 1].

    Example:
      >>> import jaxnorm.interop as ji
      >>> ji.momentum_to_torch(0.99)
      0.01
    """
    return _flip("momentum_to_torch", momentum)


def _flip(fn: str, momentum: Any) -> float:
    check_momentum(fn, momentum)
    # round away the binary noise of 1 - m (1 - 0.1 = 0.9, not 0.9000000000000000222)
    return round(1.0 - float(momentum), 12)


def _norm_from_torch(fn: str, state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    found = _layer_keys(
        fn, state_dict, prefix, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    )
    if "running_mean" in found:
        raise_running_stats(fn, prefix)
    return _affine_params(found)


def layer_norm_from_torch(state_dict: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """``torch.nn.LayerNorm``'s ``weight``/``bias`` as ``{"scale", "bias"}``.

    The arrays keep PyTorch's ``normalized_shape``; ``jn.layer_norm(x, scale,
    bias, axis=(-k, ..., -1), epsilon=1e-5)`` with the k trailing axes of that
    shape (``axis=(1, 2, 3)`` for (C, H, W) on NCHW) takes them as they are.
    ``elementwise_affine=False`` gives ``{}``; ``bias=False`` no ``"bias"``.

    Args:
      state_dict: the layer's (or a model's, with ``prefix``) state dict.
      prefix: the layer's name in the state dict.

    Returns:
      ``{"scale": ..., "bias": ...}``, each present when PyTorch has it.

    Raises:
      ValueError: no entries under ``prefix`` (a layer with neither weight nor bias
        has an empty state dict: then there is nothing to convert).

    Example:
      >>> import numpy as np, jaxnorm.interop as ji
      >>> ji.layer_norm_from_torch({"weight": np.ones((2, 3)), "bias": np.zeros((2, 3))})["scale"].shape
      (2, 3)
    """
    return _norm_from_torch("layer_norm_from_torch", state_dict, prefix)


def group_norm_from_torch(state_dict: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """``torch.nn.GroupNorm``'s (C,) ``weight``/``bias`` as ``{"scale", "bias"}``.

    Use them as ``jn.group_norm(x, scale, bias, num_groups=G, channel_axis=1,
    epsilon=1e-5)`` on NCHW.

    Args:
      state_dict: the layer's (or a model's, with ``prefix``) state dict.
      prefix: the layer's name in the state dict.

    Returns:
      ``{"scale": (C,), "bias": (C,)}``.

    Raises:
      ValueError: no entries under ``prefix``.

    Example:
      >>> import numpy as np, jaxnorm.interop as ji
      >>> sorted(ji.group_norm_from_torch({"gn.weight": np.ones(4), "gn.bias": np.zeros(4)}, prefix="gn"))
      ['bias', 'scale']
    """
    return _norm_from_torch("group_norm_from_torch", state_dict, prefix)


def instance_norm_from_torch(state_dict: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """``torch.nn.InstanceNorm1d/2d/3d(affine=True)``'s (C,) ``weight``/``bias`` as ``{"scale", "bias"}``.

    Use them as ``jn.instance_norm(x, scale, bias, channel_axis=1, epsilon=1e-5)``
    on NCHW. (``affine=False``, PyTorch's default, has an empty state dict and
    nothing to convert.)

    Args:
      state_dict: the layer's (or a model's, with ``prefix``) state dict.
      prefix: the layer's name in the state dict.

    Returns:
      ``{"scale": (C,), "bias": (C,)}``.

    Raises:
      ValueError: no entries under ``prefix``, or running statistics
        (``track_running_stats=True``), which a per-example norm does not use.

    Example:
      >>> import numpy as np, jaxnorm.interop as ji
      >>> ji.instance_norm_from_torch({"weight": np.ones(4), "bias": np.zeros(4)})["bias"].shape
      (4,)
    """
    return _norm_from_torch("instance_norm_from_torch", state_dict, prefix)


def layer_norm_to_torch(
    params: Mapping[str, Any] | None, *, prefix: str = "", as_tensor: Callable[[np.ndarray], Any] | None = None
) -> dict[str, Any]:
    """``{"scale", "bias"}`` as ``torch.nn.LayerNorm``'s ``weight``/``bias``.

    The arrays must have the shape of the layer's ``normalized_shape``.

    Args:
      params: ``{"scale", "bias"}`` (each optional).
      prefix: the layer's name, prepended to every key.
      as_tensor: applied to every array, e.g. ``torch.from_numpy``.

    Returns:
      ``{"weight": ..., "bias": ...}`` (the ones present).

    Example:
      >>> import jax.numpy as jnp, jaxnorm.interop as ji
      >>> sorted(ji.layer_norm_to_torch({"scale": jnp.ones(3), "bias": jnp.zeros(3)}, prefix="ln"))
      ['ln.bias', 'ln.weight']
    """
    return _as_tensors(_affine_to_torch(params, prefix), as_tensor)


def group_norm_to_torch(
    params: Mapping[str, Any] | None, *, prefix: str = "", as_tensor: Callable[[np.ndarray], Any] | None = None
) -> dict[str, Any]:
    """``{"scale", "bias"}`` (C,) as ``torch.nn.GroupNorm``'s ``weight``/``bias``.

    Args:
      params: ``{"scale", "bias"}`` (each optional).
      prefix: the layer's name, prepended to every key.
      as_tensor: applied to every array, e.g. ``torch.from_numpy``.

    Returns:
      ``{"weight": (C,), "bias": (C,)}`` (the ones present).

    Example:
      >>> import jax.numpy as jnp, jaxnorm.interop as ji
      >>> ji.group_norm_to_torch({"scale": jnp.ones(4)})["weight"].shape
      (4,)
    """
    return _as_tensors(_affine_to_torch(params, prefix), as_tensor)


def instance_norm_to_torch(
    params: Mapping[str, Any] | None, *, prefix: str = "", as_tensor: Callable[[np.ndarray], Any] | None = None
) -> dict[str, Any]:
    """``{"scale", "bias"}`` (C,) as ``torch.nn.InstanceNorm*d(affine=True)``'s ``weight``/``bias``.

    Args:
      params: ``{"scale", "bias"}`` (each optional).
      prefix: the layer's name, prepended to every key.
      as_tensor: applied to every array, e.g. ``torch.from_numpy``.

    Returns:
      ``{"weight": (C,), "bias": (C,)}`` (the ones present).

    Example:
      >>> import jax.numpy as jnp, jaxnorm.interop as ji
      >>> sorted(ji.instance_norm_to_torch({"scale": jnp.ones(4), "bias": jnp.zeros(4)}))
      ['bias', 'weight']
    """
    return _as_tensors(_affine_to_torch(params, prefix), as_tensor)
