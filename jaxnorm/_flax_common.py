"""What the linen and NNX layers share: option merging and the core's keyword arguments.

No flax import: both :mod:`jaxnorm._linen` and :mod:`jaxnorm._nnx` import
this module, and neither imports the other (``import jaxnorm.nnx`` loads no
``jaxnorm.linen``).

- No switch. Nothing here (or anywhere in jaxnorm) is ambient: a layer's
  result depends on its fields, its call arguments and its variables. Flax
  layers keep their statistics as plain variables, where the PreciseBN mark
  of :mod:`jaxnorm._src.state` cannot travel as a type; it travels in the
  count's layout instead (``state.PASS_LAYOUT``), which the layers read with
  ``state.stats_from_arrays`` and write with ``state.stats_as_arrays``.
- :func:`merge_call_option`: flax's rule for an option given as a field and at call time.
- ``*_options``: the keyword arguments each layer hands its core function,
  read from the attributes both frameworks' layers share (same names as
  flax's fields), so the lists stand once.
"""

from __future__ import annotations

from typing import Any


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
        average=layer.average, unbiased=layer.unbiased,
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
