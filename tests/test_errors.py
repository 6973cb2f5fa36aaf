"""Bad input: each gets a ValueError at trace time naming function, argument, rule and fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

X = jnp.ones((4, 6))
S = jn.init_batch_stats(6)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: jn.batch_norm(X, S, training=True, axis=2),
            r"batch_norm: `axis`=2 is out of range for `x` of shape \(4, 6\)",
        ),
        (
            lambda: jn.batch_norm(X, S, training=True, axis=(1, -1)),
            r"batch_norm: `axis`=\(1, -1\) names an axis more than once",
        ),
        (lambda: jn.layer_norm(X, axis=(0, 0)), r"layer_norm: `axis`=\(0, 0\) names an axis more than once"),
        (lambda: jn.moments(X, 5), r"moments: `axes`=5 is out of range"),
        (
            lambda: jn.batch_norm(X, jn.init_batch_stats(5), training=True),
            r"batch_norm: `stats.mean` has shape \(5,\).*keeps features of shape \(6,\).*init_batch_stats\(\(6,\)\)",
        ),
        (
            lambda: jn.batch_norm(X, S, jnp.ones(5), training=True),
            r"batch_norm: `scale` has shape \(5,\).*needs \(6,\)",
        ),
        (lambda: jn.batch_norm(X, S, None, jnp.ones((6, 1)), training=False), r"batch_norm: `bias` has shape \(6, 1\)"),
        (
            lambda: jn.layer_norm(X, jnp.ones(4)),
            r"layer_norm: `scale` of shape \(4,\) does not broadcast against `x` of shape \(4, 6\)",
        ),
        (lambda: jn.rms_norm(X, jnp.ones(3)), r"rms_norm: `scale` of shape \(3,\)"),
        (
            lambda: jn.group_norm(jnp.ones((2, 4, 4, 32)), num_groups=3),
            r"group_norm: `num_groups`=3 must divide the 32 channels of `x` \(shape \(2, 4, 4, 32\)\); pass a divisor of 32 or `group_size=`",  # noqa: E501
        ),
        (lambda: jn.group_norm(X, group_size=4), r"group_norm: `group_size`=4 must divide the 6 channels"),
        (
            lambda: jn.group_norm(X, num_groups=2, group_size=3),
            r"group_norm: pass exactly one of `num_groups` and `group_size`",
        ),
        (
            lambda: jn.group_norm(X),
            r"group_norm: pass exactly one of `num_groups` and `group_size`, got num_groups=None",
        ),
        (
            lambda: jn.group_norm(jnp.ones((2, 3, 6)), num_groups=2, reduction_axes=(1,)),
            r"group_norm: `reduction_axes`=\(1,\) must include the channel axis 2",
        ),
        (lambda: jn.group_norm(X, jnp.ones(3), num_groups=2), r"group_norm: `scale` has shape \(3,\)"),
        (lambda: jn.group_norm(X, num_groups=2, channel_axis=0), r"group_norm: `channel_axis`=0 is the batch axis"),
        (lambda: jn.instance_norm(jnp.ones(5)), r"instance_norm: `x` must have a batch axis and a channel axis"),
        (
            lambda: jn.batch_norm(X, S, training=True, mask=jnp.ones((3, 1), bool)),
            r"batch_norm: `mask` of shape \(3, 1\) does not broadcast to `x` of shape \(4, 6\)",
        ),
        (lambda: jn.layer_norm(X, mask=jnp.ones((4, 6))), r"layer_norm: `mask` must be boolean"),
        (lambda: jn.moments(X, 0, mask=jnp.ones((5,), bool)), r"moments: `mask` of shape \(5,\) does not broadcast"),
        (
            lambda: jn.batch_norm(X, S, training=True, average="mean"),
            r"batch_norm: `average`='mean' is not one of 'ema', 'cumulative'",
        ),
        (lambda: jn.batch_norm(X, S, training=1), r"batch_norm: `training` must be a Python bool, got 1"),
        (
            lambda: jn.batch_norm(jnp.ones((4, 6), jnp.int32), S, training=True),
            r"batch_norm: `x` must have a real floating dtype, got int32",
        ),
        (
            lambda: jn.layer_norm(jnp.ones((2, 3), jnp.complex64)),
            r"layer_norm: `x` has dtype complex64 .*complex inputs are unsupported",
        ),
        (lambda: jn.moments(jnp.arange(4), 0), r"moments: `x` must have a real floating dtype"),
        (
            lambda: jn.group_norm(jnp.ones((2, 4), jnp.int8), num_groups=2),
            r"group_norm: `x` must have a real floating dtype",
        ),
        (
            lambda: jn.normalize(X, jnp.zeros(5), 1.0, epsilon=1e-5),
            r"normalize: `mean` of shape \(5,\) does not broadcast to `x`",
        ),
        (
            lambda: jn.batch_norm(jnp.ones((1, 6)), S, training=True),
            r"batch_norm: training needs more than one value per feature",
        ),
        (
            lambda: jn.batch_norm(X, S, training=True, epsilon=-1e-5),
            r"batch_norm: `epsilon` must be a finite number >= 0, got -1e-05; pass e.g. `epsilon=1e-5`",
        ),
        (
            lambda: jn.batch_norm(X, S, training=False, epsilon=float("nan")),
            r"batch_norm: `epsilon` must be a finite number >= 0, got nan",
        ),
        (lambda: jn.batch_renorm(X, S, training=True, epsilon=-1.0), r"batch_renorm: `epsilon` must be"),
        (lambda: jn.layer_norm(X, epsilon=-1.0), r"layer_norm: `epsilon` must be"),
        (lambda: jn.rms_norm(X, epsilon=float("inf")), r"rms_norm: `epsilon` must be"),
        (lambda: jn.group_norm(X, num_groups=2, epsilon=-1.0), r"group_norm: `epsilon` must be"),
        (lambda: jn.instance_norm(jnp.ones((2, 3, 4)), epsilon=(1e-5, 1e-5)), r"instance_norm: `epsilon` must be"),
        (lambda: jn.normalize(X, 0.0, 1.0, epsilon=-1.0), r"normalize: `epsilon` must be"),
        (lambda: jn.fold_batch_norm(jnp.ones((3, 6)), None, S, epsilon="small"), r"fold_batch_norm: `epsilon` must be"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_traced_training_flag_says_to_make_it_static():
    with pytest.raises(
        ValueError,
        match=r"batch_norm: `training` must be a static Python bool, got a traced value.*static_argnames='training'",
    ):
        jax.jit(lambda x, t: jn.batch_norm(x, S, training=t))(X, True)


def test_errors_happen_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="group_norm"):
        jax.jit(lambda x: jn.group_norm(x, num_groups=5))(X)


def test_numpy_bool_is_accepted_as_static():
    y, _ = jn.batch_norm(X, S, training=np.bool_(False))
    assert y.shape == X.shape
