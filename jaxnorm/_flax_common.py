"""What the linen and NNX layers share: the one Flax-side switch, option merging, and the core's keyword arguments.

No flax import: both :mod:`jaxnorm._linen` and :mod:`jaxnorm._nnx` import
this module, and neither imports the other (``import jaxnorm.nnx`` loads no
``jaxnorm.linen``).

- The switch. Flax layers keep their statistics as plain variables, so the
  PreciseBN mark of :mod:`jaxnorm._src.state` (a ``RecalibrationStats``
  state) cannot travel in a type there. One ``ContextVar`` remains, on this
  side only: :func:`override_average` (public as
  ``jaxnorm.linen.override_average``) sets the averaging policy of every
  jaxnorm layer traced inside it, and :func:`recalibrating` (used by the
  ``recalibrate`` of both frameworks) makes every layer hand the core a
  ``RecalibrationStats`` state. The alternative, rebuilding a trained model
  with other fields, is what the switch saves the user; the core itself never
  reads it (the layers pass what it says as arguments).
- :func:`merge_call_option`: flax's rule for an option given as a field and at call time.
- ``*_options``: the keyword arguments each layer hands its core function,
  read from the attributes both frameworks' layers share (same names as
  flax's fields), so the lists stand once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from jaxnorm._src.checks import check_choice
from jaxnorm._src.state import AVERAGES, BatchStats, ExactRecalibrationStats, RecalibrationStats

_RECALIBRATE = {"average": "recalibrate", "exact": "recalibrate-exact"}
_SWITCH: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxnorm_flax_switch", default=None)


@contextlib.contextmanager
def override_average(average: str) -> Iterator[None]:
    """Makes every jaxnorm BatchNorm (linen and NNX) traced inside use ``average``.

    The hook for recalibration passes (PreciseBN): switch a trained model to
    ``average="cumulative"`` from fresh statistics (``fresh_batch_stats`` /
    ``reset_batch_stats``) without rebuilding it. The override is read when a
    layer is traced, so call ``model.apply`` (or a function jitted for the
    first time) inside the ``with`` block; an already-compiled ``jax.jit``
    function keeps the policy it was traced with. The functional core has no
    such switch: there the policy is the ``average`` argument.

    Args:
      average: ``"ema"`` or ``"cumulative"``.

    Raises:
      ValueError: an unknown policy.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> bn = jnl.BatchNorm(use_running_average=False)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> v = bn.init(jax.random.key(0), x)
      >>> with jnl.override_average("cumulative"):
      ...     _, upd = bn.apply(v, x, mutable=["batch_stats"])
      >>> upd["batch_stats"]["mean"].tolist()
      [3.0, 4.0]
    """
    check_choice("override_average", "average", average, AVERAGES)
    token = _SWITCH.set(average)
    try:
        yield
    finally:
        _SWITCH.reset(token)


@contextlib.contextmanager
def recalibrating(population: str = "average") -> Iterator[None]:
    """Within it, every jaxnorm layer traced hands the core a ``RecalibrationStats`` state (PreciseBN).

    ``population="exact"`` makes it an ``ExactRecalibrationStats`` (the
    caller has checked the value; the pass gives the count its layout).
    """
    token = _SWITCH.set(_RECALIBRATE[population])
    try:
        yield
    finally:
        _SWITCH.reset(token)


def current_average(field: str) -> str:
    """The averaging policy in force: :func:`override_average`'s, else the layer's field."""
    value = _SWITCH.get()
    return field if value is None or value in _RECALIBRATE.values() else value


def layer_stats(mean: Any, var: Any, count: Any) -> BatchStats:
    """A layer's variables as the core's state: a ``RecalibrationStats`` inside :func:`recalibrating`."""
    value = _SWITCH.get()
    kind = {_RECALIBRATE["average"]: RecalibrationStats, _RECALIBRATE["exact"]: ExactRecalibrationStats}.get(
        value, BatchStats
    )
    return kind(mean, var, count)


def merge_call_option(fn: str, name: str, field: Any, call: Any, *, example: str, call_example: str) -> Any:
    """Returns the one of ``field`` (constructor) and ``call`` (call time) that is set.

    Flax's ``merge_param`` rule: an option given in both places, or in neither,
    is an error; the message shows both ways of passing it.
    """
    if field is not None and call is not None:
        raise ValueError(
            f"{fn}: `{name}` was passed both to the constructor ({field!r}) and at call "
            f"time ({call!r}); pass it once, either as `{example}` or as `{call_example}`."
        )
    if field is None and call is None:
        raise ValueError(
            f"{fn}: `{name}` was passed neither to the constructor nor at call time; "
            f"pass it once, either as `{example}` or as `{call_example}`."
        )
    return field if field is not None else call


def batch_norm_options(layer: Any, *, initializing: bool = False) -> dict[str, Any]:
    """``jn.batch_norm`` / ``jn.batch_renorm`` keyword arguments from a layer's fields.

    During flax's ``init`` the named axis is not bound, so it is dropped (as flax does).
    """
    return dict(
        axis=layer.axis, momentum=layer.momentum, epsilon=layer.epsilon,
        average=current_average(layer.average), unbiased=layer.unbiased,
        axis_name=None if initializing else layer.axis_name,
        axis_index_groups=None if initializing else layer.axis_index_groups,
    )


def layer_norm_options(layer: Any) -> dict[str, Any]:
    """``jn.layer_norm`` / ``jn.rms_norm`` keyword arguments from a layer's fields."""
    return dict(
        axis=layer.reduction_axes, epsilon=layer.epsilon, feature_axes=layer.feature_axes,
        axis_name=layer.axis_name, axis_index_groups=layer.axis_index_groups,
    )


def group_norm_options(layer: Any) -> dict[str, Any]:
    """``jn.group_norm`` keyword arguments from a layer's fields (channels last, as flax)."""
    return dict(
        num_groups=layer.num_groups, group_size=layer.group_size, channel_axis=-1,
        reduction_axes=layer.reduction_axes, epsilon=layer.epsilon,
        axis_name=layer.axis_name, axis_index_groups=layer.axis_index_groups,
    )


def instance_norm_options(layer: Any) -> dict[str, Any]:
    """``jn.instance_norm`` keyword arguments from a layer's fields."""
    return dict(
        channel_axis=layer.feature_axes, epsilon=layer.epsilon,
        axis_name=layer.axis_name, axis_index_groups=layer.axis_index_groups,
    )
