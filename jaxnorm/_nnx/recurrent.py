"""Normalized recurrent cells for ``flax.nnx.RNN``: layer-norm LSTM and GRU, recurrent batch norm.

NNX twins of :mod:`jaxnorm._linen.recurrent`, with flax NNX's constructor
convention (``in_features, hidden_features, *, rngs``) and the arguments of
``nnx.LSTMCell`` / ``nnx.GRUCell`` where they apply. The step equations live in
:mod:`jaxnorm._src.recurrent`; the norms are :func:`jaxnorm.layer_norm` and
:func:`jaxnorm.batch_norm`.

Variables (H = ``hidden_features``, D = ``in_features``): ``nnx.Param``
``input_kernel`` (D, kH), ``recurrent_kernel`` (H, kH) (k = 4 for the LSTM, 3
for the GRU), ``bias`` (4H,) on the LSTMs, and ``input_norm``,
``recurrent_norm``, ``cell_norm`` submodules holding ``scale``/``bias``. The
batch-normalized cell's norms hold ``nnx.BatchStat`` ``mean``/``var`` of shape
(max_steps, ...) and ``count`` (max_steps,): one row per time step, the last
row serving every step beyond ``max_steps``. ``nnx.RNN`` carries the cell's
state through its scan, so the statistics of every step are updated in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.nnx.nn.linear import default_kernel_init
from flax.nnx.nn.recurrent import modified_orthogonal

import jaxnorm as jn
from jaxnorm._src import checks
from jaxnorm._src import recurrent as core
from jaxnorm._src.recurrent import StepCarry

Array = jax.Array
Dtype = Any
Initializer = Any

__all__ = ["BatchNormLSTMCell", "LayerNormGRUCell", "LayerNormLSTMCell", "StepCarry"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})
# flax's defaults, made once (an initializer call in a signature would be one per definition anyway)
_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()
_ORTHOGONAL = initializers.orthogonal()
_TENTH = initializers.constant(0.1)  # Cooijmans et al.'s gain initialization


class _LayerNorm(nnx.Module):
    """scale/bias of ``shape`` (C,) and one call of :func:`jaxnorm.layer_norm` over the last axis."""

    def __init__(self, shape: tuple[int, ...], *, epsilon: float, scale_init: Initializer, bias_init: Initializer,
                 dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype))
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        return jn.layer_norm(x, self.scale[...], self.bias[...], epsilon=self.epsilon, dtype=self.dtype)


class _StepBatchNorm(nnx.Module):
    """scale (and bias) of ``shape`` (C,), (max_steps, C) running statistics, one :func:`jaxnorm.batch_norm` a step."""

    def __init__(self, shape: tuple[int, ...], *, max_steps: int, use_bias: bool, momentum: float, epsilon: float,
                 scale_init: Initializer, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        scale = scale_init(rngs.params(), shape, param_dtype)
        self.scale = nnx.Param(scale)
        # zeros made without a key: drawing one here would shift the initialization of every later layer
        self.bias = nnx.Param(jnp.zeros_like(scale, dtype=param_dtype)) if use_bias else nnx.data(None)
        fresh = core.init_step_stats(max_steps, shape)
        self.mean = nnx.BatchStat(fresh.mean)
        self.var = nnx.BatchStat(fresh.var)
        self.count = nnx.BatchStat(fresh.count)
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: Array, slot: Array, mask: Array | None, *, training: bool) -> Array:
        rows = jn.BatchStats(self.mean[...], self.var[...], self.count[...])
        y, new = jn.batch_norm(
            x, core.step_stats(rows, slot), self.scale[...], None if self.bias is None else self.bias[...],
            training=training, momentum=self.momentum, epsilon=self.epsilon, mask=mask if training else None,
            dtype=self.dtype,
        )
        if training:
            self.mean[...], self.var[...], self.count[...] = core.with_step_stats(rows, slot, new)
        return y


def _carry_keys(rngs: Any, n: int) -> list[Array]:
    """Keys for ``carry_init`` (flax's RNN passes its ``carry`` stream); fixed ones without rngs."""
    if isinstance(rngs, nnx.Rngs):
        rngs = rngs.carry
    if rngs is None:
        return list(jax.random.split(jax.random.key(0), n))
    return [rngs() for _ in range(n)]


class _Cell(nnx.RNNCellBase):
    """What the three cells share: the gate kernels and bias of the core's shapes, the options, the carry."""

    def _init_cell(
        self, kind: str, in_features: int, hidden_features: int, *, gate_fn: Callable[..., Any],
        activation_fn: Callable[..., Any], kernel_init: Initializer, recurrent_kernel_init: Initializer,
        gate_bias_init: Initializer | None, dtype: Dtype | None, param_dtype: Dtype, carry_init: Initializer | None,
        rngs: nnx.Rngs, kernel_metadata: Mapping[str, Any], recurrent_kernel_metadata: Mapping[str, Any],
        bias_metadata: Mapping[str, Any],
    ) -> core.CellShapes:
        """``input_kernel``, ``recurrent_kernel`` and (LSTM) the gate ``bias``, in that order; returns the shapes."""
        shapes = core.cell_shapes(kind, in_features, hidden_features)
        self.input_kernel = nnx.Param(core.per_gate_init(kernel_init, shapes.num_gates)(
            rngs.params(), shapes.input_kernel, param_dtype), **kernel_metadata)
        self.recurrent_kernel = nnx.Param(core.per_gate_init(recurrent_kernel_init, shapes.num_gates)(
            rngs.params(), shapes.recurrent_kernel, param_dtype), **recurrent_kernel_metadata)
        if shapes.bias is not None:
            self.bias = nnx.Param(gate_bias_init(rngs.params(), shapes.bias, param_dtype), **bias_metadata)
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.gate_fn = gate_fn
        self.activation_fn = activation_fn
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.carry_init = carry_init
        return shapes

    def _check_hidden(self, fn: str, h: Array) -> None:
        core.check_hidden_state(fn, h, self.hidden_features, name="hidden_features",
                                fix="cell.initialize_carry(x.shape)")

    def _initial_states(self, input_shape: tuple[int, ...], rngs: Any, carry_init: Initializer | None,
                        n: int) -> list[Array]:
        """``n`` states (c and h, or h) of shape (..., H), one key each."""
        init = carry_init or self.carry_init or initializers.zeros_init()
        shape = core.carry_shape(input_shape, self.hidden_features)
        return [init(key, shape, self.param_dtype) for key in _carry_keys(rngs, n)]

    @property
    def num_feature_axes(self) -> int:
        return 1


class LayerNormLSTMCell(_Cell):
    r"""Layer-normalized LSTM cell (Ba, Kiros & Hinton 2016, eqs. 20-22), NNX twin.

    ``(i, f, g, o) = LN(W_x x_t) + LN(W_h h_{t-1}) + b``, ``c_t = sigma(f) *
    c_{t-1} + sigma(i) * tanh(g)``, ``h_t = sigma(o) * tanh(LN(c_t))``; see
    :class:`jaxnorm.linen.LayerNormLSTMCell`. Scaling every input by a positive
    constant leaves the outputs unchanged.

    Shapes: x (..., D) per step with D = ``in_features``; carry ``(c, h)``,
    each (..., H) with H = ``hidden_features``; ``nnx.RNN`` runs it over
    (..., T, D).

    Args:
      in_features: D.
      hidden_features: H.
      gate_fn, activation_fn: sigmoid and tanh by default.
      kernel_init, recurrent_kernel_init: initializers of each gate's block of
        the (D, 4H) and (H, 4H) kernels (flax's defaults).
      bias_init: initializer of the gate bias (4H,).
      dtype, param_dtype: computation and parameter dtypes.
      carry_init: initializer of c and h (or pass it to ``initialize_carry``).
      epsilon: added to the variance in each layer norm.
      scale_init: initializer of the layer norms' gains.
      rngs: ``nnx.Rngs`` for the initializers.
      kernel_metadata, recurrent_kernel_metadata, bias_metadata: ``nnx.Param`` metadata.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> rnn = nnx.RNN(jnx.LayerNormLSTMCell(3, 5, rngs=nnx.Rngs(0)))
      >>> rnn(jnp.ones((2, 7, 3))).shape
      (2, 7, 5)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        gate_fn: Callable[..., Any] = nnx.sigmoid,
        activation_fn: Callable[..., Any] = nnx.tanh,
        kernel_init: Initializer = default_kernel_init,
        recurrent_kernel_init: Initializer = modified_orthogonal,
        bias_init: Initializer = _ZEROS,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        carry_init: Initializer | None = None,
        epsilon: float = 1e-6,
        scale_init: Initializer = _ONES,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = _EMPTY,
        recurrent_kernel_metadata: Mapping[str, Any] = _EMPTY,
        bias_metadata: Mapping[str, Any] = _EMPTY,
    ):
        shapes = self._init_cell(
            "lstm", in_features, hidden_features, gate_fn=gate_fn, activation_fn=activation_fn,
            kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init, gate_bias_init=bias_init,
            dtype=dtype, param_dtype=param_dtype, carry_init=carry_init, rngs=rngs, kernel_metadata=kernel_metadata,
            recurrent_kernel_metadata=recurrent_kernel_metadata, bias_metadata=bias_metadata,
        )
        norm = dict(epsilon=epsilon, scale_init=scale_init, bias_init=initializers.zeros_init(), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)
        self.input_norm = _LayerNorm(shapes.gates, **norm)
        self.recurrent_norm = _LayerNorm(shapes.gates, **norm)
        self.cell_norm = _LayerNorm(shapes.hidden, **norm)

    def __call__(self, carry: tuple[Array, Array], inputs: Array) -> tuple[tuple[Array, Array], Array]:
        """One step: ``((c, h), x) -> ((c_t, h_t), h_t)``."""
        c, h = carry
        self._check_hidden("jaxnorm.nnx.LayerNormLSTMCell", h)
        new_c, new_h = core.lstm_step(
            c, h, inputs, self.input_kernel[...], self.recurrent_kernel[...], self.bias[...],
            input_norm=self.input_norm, recurrent_norm=self.recurrent_norm, cell_norm=self.cell_norm,
            gate_fn=self.gate_fn, activation_fn=self.activation_fn, dtype=self.dtype,
        )
        return (new_c, new_h), new_h

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: Any = None,
                         carry_init: Initializer | None = None) -> tuple[Array, Array]:
        """``(c, h)``, each (..., H), for inputs of shape (..., D)."""
        c, h = self._initial_states(input_shape, rngs, carry_init, 2)
        return c, h


class LayerNormGRUCell(_Cell):
    r"""Layer-normalized GRU cell, NNX twin of :class:`jaxnorm.linen.LayerNormGRUCell`.

    ``(r_x, z_x, n_x) = LN(W_x x_t)``, ``(r_h, z_h, n_h) = LN(W_h h_{t-1})``,
    ``r = sigma(r_x + r_h)``, ``z = sigma(z_x + z_h)``, ``n = tanh(n_x + r *
    n_h)``, ``h_t = (1 - z) * n + z * h_{t-1}``; the norms' biases take the
    place of flax's gate biases.

    Shapes: x (..., D) per step; carry h (..., H).

    Args:
      in_features: D.
      hidden_features: H.
      gate_fn, activation_fn: sigmoid and tanh by default.
      kernel_init, recurrent_kernel_init: initializers of each gate's block of
        the (D, 3H) and (H, 3H) kernels (flax's defaults).
      bias_init: initializer of the layer norms' biases.
      dtype, param_dtype: computation and parameter dtypes.
      carry_init: initializer of h.
      epsilon: added to the variance in each layer norm.
      scale_init: initializer of the layer norms' gains.
      rngs: ``nnx.Rngs`` for the initializers.
      kernel_metadata, recurrent_kernel_metadata: ``nnx.Param`` metadata.

    Example:
      >>> import jax.numpy as jnp, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> nnx.RNN(jnx.LayerNormGRUCell(3, 5, rngs=nnx.Rngs(0)))(jnp.ones((2, 7, 3))).shape
      (2, 7, 5)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        gate_fn: Callable[..., Any] = nnx.sigmoid,
        activation_fn: Callable[..., Any] = nnx.tanh,
        kernel_init: Initializer = default_kernel_init,
        recurrent_kernel_init: Initializer = _ORTHOGONAL,
        bias_init: Initializer = _ZEROS,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        carry_init: Initializer | None = None,
        epsilon: float = 1e-6,
        scale_init: Initializer = _ONES,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = _EMPTY,
        recurrent_kernel_metadata: Mapping[str, Any] = _EMPTY,
    ):
        shapes = self._init_cell(
            "gru", in_features, hidden_features, gate_fn=gate_fn, activation_fn=activation_fn,
            kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init, gate_bias_init=None,
            dtype=dtype, param_dtype=param_dtype, carry_init=carry_init, rngs=rngs, kernel_metadata=kernel_metadata,
            recurrent_kernel_metadata=recurrent_kernel_metadata, bias_metadata=_EMPTY,
        )
        norm = dict(epsilon=epsilon, scale_init=scale_init, bias_init=bias_init, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)
        self.input_norm = _LayerNorm(shapes.gates, **norm)
        self.recurrent_norm = _LayerNorm(shapes.gates, **norm)

    def __call__(self, carry: Array, inputs: Array) -> tuple[Array, Array]:
        """One step: ``(h, x) -> (h_t, h_t)``."""
        self._check_hidden("jaxnorm.nnx.LayerNormGRUCell", carry)
        new_h = core.gru_step(
            carry, inputs, self.input_kernel[...], self.recurrent_kernel[...],
            input_norm=self.input_norm, recurrent_norm=self.recurrent_norm,
            gate_fn=self.gate_fn, activation_fn=self.activation_fn, dtype=self.dtype,
        )
        return new_h, new_h

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: Any = None,
                         carry_init: Initializer | None = None) -> Array:
        """h (..., H) for inputs of shape (..., D)."""
        (h,) = self._initial_states(input_shape, rngs, carry_init, 1)
        return h


class BatchNormLSTMCell(_Cell):
    r"""Recurrent batch normalization (Cooijmans et al. 2016), NNX twin of :class:`jaxnorm.linen.BatchNormLSTMCell`.

    ``(i, f, g, o) = BN(W_x x_t) + BN(W_h h_{t-1}) + b``, ``c_t = sigma(f) *
    c_{t-1} + sigma(i) * tanh(g)``, ``h_t = sigma(o) * tanh(BN(c_t))``, the
    gains initialized to 0.1, no bias on the two projections. Each of the three
    norms keeps (max_steps, ...) running statistics, one row per time step;
    the carry's ``step`` picks the row, and every step at or beyond
    ``max_steps`` uses (and in training updates) the last row, as the paper
    evaluates sequences longer than those trained on. ``model.train()`` /
    ``model.eval()`` (or ``nnx.view(model, use_running_average=...)``) switch
    between batch statistics and the running ones.

    Padding: ``nnx.RNN`` runs the cell on padded steps too; start from
    ``cell.initialize_carry(x[:, 0].shape, seq_lengths=lengths)`` (passed as
    ``initial_carry``) to keep the steps at or after each example's length out
    of the statistics.

    Shapes: x (..., D) per step; carry :class:`StepCarry` ``(c, h, step,
    length)``: c and h (..., H), step (...) int32, length (...) int32 or None.

    Args:
      in_features: D.
      hidden_features: H.
      max_steps: rows of running statistics (the training sequence length).
      use_running_average: False (default) to train, True to evaluate.
      momentum: weight on the old running value (flax's direction; PyTorch's 0.1 is 0.9 here).
      epsilon: added to the variance.
      gate_fn: and ``activation_fn``, ``kernel_init``, ``recurrent_kernel_init``, ``bias_init``,
        ``dtype``, ``param_dtype``, ``carry_init``: as in :class:`LayerNormLSTMCell`.
      scale_init: initializer of the three gains (default 0.1, the paper's).
      rngs: ``nnx.Rngs`` for the initializers.
      kernel_metadata, recurrent_kernel_metadata, bias_metadata: ``nnx.Param`` metadata.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.nnx as jnx
      >>> from flax import nnx
      >>> cell = jnx.BatchNormLSTMCell(3, 4, max_steps=5, rngs=nnx.Rngs(0))
      >>> rnn = nnx.RNN(cell)
      >>> x = jax.random.normal(jax.random.key(1), (8, 5, 3))
      >>> y = rnn(x)                                  # training: updates every step's statistics
      >>> cell.input_norm.mean.shape, cell.input_norm.count[...].tolist()
      ((5, 16), [1, 1, 1, 1, 1])
      >>> rnn.eval()
      >>> rnn(jnp.concatenate([x, x], axis=1)).shape   # 10 steps: steps 5-9 use row 4
      (8, 10, 4)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        max_steps: int,
        use_running_average: bool = False,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        gate_fn: Callable[..., Any] = nnx.sigmoid,
        activation_fn: Callable[..., Any] = nnx.tanh,
        kernel_init: Initializer = default_kernel_init,
        recurrent_kernel_init: Initializer = modified_orthogonal,
        bias_init: Initializer = _ZEROS,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        carry_init: Initializer | None = None,
        scale_init: Initializer = _TENTH,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = _EMPTY,
        recurrent_kernel_metadata: Mapping[str, Any] = _EMPTY,
        bias_metadata: Mapping[str, Any] = _EMPTY,
    ):
        max_steps = core.check_num_steps("jaxnorm.nnx.BatchNormLSTMCell", max_steps, "max_steps")
        checks.check_epsilon("jaxnorm.nnx.BatchNormLSTMCell", epsilon)
        shapes = self._init_cell(
            "lstm", in_features, hidden_features, gate_fn=gate_fn, activation_fn=activation_fn,
            kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init, gate_bias_init=bias_init,
            dtype=dtype, param_dtype=param_dtype, carry_init=carry_init, rngs=rngs, kernel_metadata=kernel_metadata,
            recurrent_kernel_metadata=recurrent_kernel_metadata, bias_metadata=bias_metadata,
        )
        norm = dict(max_steps=max_steps, momentum=momentum, epsilon=epsilon, scale_init=scale_init, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)
        self.input_norm = _StepBatchNorm(shapes.gates, use_bias=False, **norm)
        self.recurrent_norm = _StepBatchNorm(shapes.gates, use_bias=False, **norm)
        self.cell_norm = _StepBatchNorm(shapes.hidden, use_bias=True, **norm)
        self.max_steps = max_steps
        self.use_running_average = use_running_average

    def __call__(self, carry: StepCarry, inputs: Array) -> tuple[StepCarry, Array]:
        """One step: ``(carry, x) -> (carry_t, h_t)``; in training also updates this step's statistics."""
        fn = "jaxnorm.nnx.BatchNormLSTMCell"
        training = not checks.check_static_bool(fn, "use_running_average", self.use_running_average)
        if not isinstance(carry, StepCarry):
            raise ValueError(
                f"{fn}: `carry` must be the cell's StepCarry (c, h, step, length), got {type(carry).__name__}; "
                f"build it with `cell.initialize_carry(x.shape)` (nnx.RNN does so by default)."
            )
        self._check_hidden(fn, carry.h)
        slot = core.step_slot(carry.step, self.max_steps)
        mask = core.valid_steps(carry)

        def norm(module: _StepBatchNorm) -> Callable[[Array], Array]:
            return lambda v: module(v, slot, mask, training=training)

        new_c, new_h = core.lstm_step(
            carry.c, carry.h, inputs, self.input_kernel[...], self.recurrent_kernel[...], self.bias[...],
            input_norm=norm(self.input_norm), recurrent_norm=norm(self.recurrent_norm),
            cell_norm=norm(self.cell_norm), gate_fn=self.gate_fn, activation_fn=self.activation_fn, dtype=self.dtype,
        )
        return core.next_step(carry, new_c, new_h), new_h

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: Any = None, carry_init: Initializer | None = None,
                         *, seq_lengths: Array | None = None) -> StepCarry:
        """A :class:`StepCarry` at step 0 for inputs of shape (..., D).

        Args:
          input_shape: one step's input shape (..., D).
          rngs: keys for ``carry_init`` (``nnx.RNN`` passes its own).
          carry_init: initializer of c and h (default zeros).
          seq_lengths: optional (...) int lengths; steps at or after them
            stay out of the statistics. Pass the same lengths to the RNN.
        """
        batch = tuple(input_shape[:-1])
        lengths = core.check_lengths("jaxnorm.nnx.BatchNormLSTMCell.initialize_carry", seq_lengths, batch)
        c, h = self._initial_states(input_shape, rngs, carry_init, 2)
        return core.init_step_carry(c, h, lengths)

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``use_running_average`` when given."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
