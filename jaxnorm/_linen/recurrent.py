"""Normalized recurrent cells for ``flax.linen.RNN``: layer-norm LSTM and GRU, recurrent batch norm.

Each cell is a flax :class:`~flax.linen.RNNCellBase` (``__call__(carry, x) ->
(carry, y)``, ``initialize_carry``, ``num_feature_axes``) with the fields of
flax's ``LSTMCell``/``GRUCell`` where they apply. The step equations live in
:mod:`jaxnorm._src.recurrent`; the norms are :func:`jaxnorm.layer_norm` and
:func:`jaxnorm.batch_norm`, called with the parameters (and statistics)
declared here.

Variables (H = ``features``, D = input features):

- ``params/input_kernel`` (D, kH), ``params/recurrent_kernel`` (H, kH), k = 4
  gates for the LSTM (flax's order i, f, g, o), 3 for the GRU (r, z, n); each
  gate's block is drawn by ``kernel_init`` / ``recurrent_kernel_init`` as
  flax draws its per-gate kernels.
- ``params/bias`` (4H,): the LSTM's gate bias ``b``.
- ``params/{input_norm,recurrent_norm,cell_norm}/{scale,bias}``: the norms'
  gains and biases (the batch-normalized cell has no bias on the two
  projections: the gate bias carries it).
- ``batch_stats/{input_norm,recurrent_norm,cell_norm}/{mean,var,count}``
  (BatchNormLSTMCell): running statistics of one step; ``nn.RNN(cell,
  variable_axes={"batch_stats": 0}, variable_broadcast="params",
  split_rngs={"params": False})`` stacks them over time, (T, ...) per leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers
from flax.linen.linear import default_kernel_init

import jaxnorm as jn
from jaxnorm._src import checks
from jaxnorm._src import recurrent as core
from jaxnorm._src.recurrent import StepCarry
from jaxnorm._src.state import stats_as_arrays, stats_from_arrays

Array = jax.Array
Dtype = Any
Initializer = Any

__all__ = ["BatchNormLSTMCell", "LayerNormGRUCell", "LayerNormLSTMCell", "StepCarry", "extend_step_stats"]


class _LayerNorm(nn.Module):
    """scale/bias over the last axis and one call of :func:`jaxnorm.layer_norm`."""

    epsilon: float
    scale_init: Initializer
    bias_init: Initializer
    dtype: Dtype | None
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, shape, self.param_dtype)
        return jn.layer_norm(x, scale, bias, epsilon=self.epsilon, dtype=self.dtype)


class _BatchNorm(nn.Module):
    """scale (and bias), one step's running statistics, one call of :func:`jaxnorm.batch_norm`."""

    use_running_average: bool
    momentum: float
    epsilon: float
    use_bias: bool
    scale_init: Initializer
    bias_init: Initializer
    dtype: Dtype | None
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        shape = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, shape, self.param_dtype) if self.use_bias else None
        fresh = jn.init_batch_stats(shape)
        mean = self.variable("batch_stats", "mean", lambda: fresh.mean)
        var = self.variable("batch_stats", "var", lambda: fresh.var)
        count = self.variable("batch_stats", "count", lambda: fresh.count)
        # init only shapes the variables (and may see a single example): evaluate then
        training = not self.use_running_average and not self.is_initializing()
        y, new = jn.batch_norm(
            x, stats_from_arrays(mean.value, var.value, count.value), scale, bias, training=training,
            momentum=self.momentum, epsilon=self.epsilon, mask=mask if training else None, dtype=self.dtype,
        )
        if training:
            mean.value, var.value, count.value = stats_as_arrays(new)
        return y


class _Cell(nn.RNNCellBase):
    """What the three cells share: the gate kernels and bias of the core's shapes, the carry, the feature axes."""

    def _gate_params(self, inputs: Array, kind: str) -> tuple[Array, Array, Array | None]:
        """``input_kernel``, ``recurrent_kernel`` and (LSTM) the gate ``bias``, of :func:`core.cell_shapes`."""
        shapes = core.cell_shapes(kind, inputs.shape[-1], self.features)
        input_kernel = self.param("input_kernel", core.per_gate_init(self.kernel_init, shapes.num_gates),
                                  shapes.input_kernel, self.param_dtype)
        recurrent_kernel = self.param("recurrent_kernel", core.per_gate_init(self.recurrent_kernel_init,
                                      shapes.num_gates), shapes.recurrent_kernel, self.param_dtype)
        bias = None if shapes.bias is None else self.param("bias", self.bias_init, shapes.bias, self.param_dtype)
        return input_kernel, recurrent_kernel, bias

    def _check_hidden(self, fn: str, h: Array) -> None:
        core.check_hidden_state(fn, h, self.features, name="features", fix="cell.initialize_carry(key, x.shape)")

    def _initial_states(self, rng: Array, input_shape: tuple[int, ...], n: int) -> list[Array]:
        """``n`` states (c and h, or h) of shape (..., H) from ``carry_init``, one key each."""
        shape = core.carry_shape(input_shape, self.features)
        keys = jax.random.split(rng, n) if n > 1 else [rng]
        return [self.carry_init(key, shape, self.param_dtype) for key in keys]

    @property
    def num_feature_axes(self) -> int:
        return 1


class _LayerNormCell(_Cell):
    """The fields of the layer-normalized cells (flax's ``LSTMCell``/``GRUCell`` ones, then the norms')."""

    features: int
    gate_fn: Callable[..., Any] = nn.sigmoid
    activation_fn: Callable[..., Any] = nn.tanh
    kernel_init: Initializer = default_kernel_init
    recurrent_kernel_init: Initializer = initializers.orthogonal()
    bias_init: Initializer = initializers.zeros_init()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    carry_init: Initializer = initializers.zeros_init()
    epsilon: float = 1e-6
    scale_init: Initializer = initializers.ones

    def _norm(self, name: str, bias_init: Initializer) -> _LayerNorm:
        return _LayerNorm(epsilon=self.epsilon, scale_init=self.scale_init, bias_init=bias_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)


class LayerNormLSTMCell(_LayerNormCell):
    r"""Layer-normalized LSTM cell (Ba, Kiros & Hinton 2016, eqs. 20-22).

    Layer norm of the input projection ``W_x x`` and of the recurrent
    projection ``W_h h``, each over its 4H gate pre-activations with its own
    gain and bias, summed with the gate bias; layer norm of the cell state
    before the output activation::

        (i, f, g, o) = LN(W_x x_t) + LN(W_h h_{t-1}) + b
        c_t = sigma(f) * c_{t-1} + sigma(i) * tanh(g)
        h_t = sigma(o) * tanh(LN(c_t))

    Because ``W_x x`` is normalized on its own, scaling every input by a
    positive constant leaves the outputs unchanged (up to ``epsilon``); with a
    single input feature this keeps only the input's sign, so give such data a
    second, constant feature. Statistics are per example, so training and
    evaluation are the same and any sequence length works.

    Shapes: x (..., D) per step; carry ``(c, h)``, each (..., H) with H =
    ``features``; run over (..., T, D) with ``flax.linen.RNN``.

    Attributes:
      features: H, the hidden size.
      gate_fn: activation of the gates (default sigmoid).
      activation_fn: activation of the candidate and the output (default tanh).
      kernel_init: initializer of each gate's block of ``input_kernel`` (D, 4H).
      recurrent_kernel_init: likewise for ``recurrent_kernel`` (H, 4H) (default orthogonal).
      bias_init: initializer of the gate bias ``b`` (4H,).
      dtype: dtype of the computation (default: inferred from inputs and params).
      param_dtype: dtype of the parameters.
      carry_init: initializer of ``c`` and ``h``.
      epsilon: added to the variance in each layer norm.
      scale_init: initializer of the layer norms' gains (their biases start at 0).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 7, 3))     # (batch, time, features)
      >>> rnn = nn.RNN(jnl.LayerNormLSTMCell(5))
      >>> y, variables = rnn.init_with_output(jax.random.key(1), x)
      >>> y.shape, sorted(variables["params"]["cell"])
      ((2, 7, 5), ['bias', 'cell_norm', 'input_kernel', 'input_norm', 'recurrent_kernel', 'recurrent_norm'])
    """

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], inputs: Array) -> tuple[tuple[Array, Array], Array]:
        """One step: ``((c, h), x) -> ((c_t, h_t), h_t)``; x (..., D), c and h (..., H)."""
        c, h = carry
        self._check_hidden("jaxnorm.linen.LayerNormLSTMCell", h)
        input_kernel, recurrent_kernel, bias = self._gate_params(inputs, "lstm")
        zeros = initializers.zeros_init()
        new_c, new_h = core.lstm_step(
            c, h, inputs, input_kernel, recurrent_kernel, bias,
            input_norm=self._norm("input_norm", zeros), recurrent_norm=self._norm("recurrent_norm", zeros),
            cell_norm=self._norm("cell_norm", zeros),
            gate_fn=self.gate_fn, activation_fn=self.activation_fn, dtype=self.dtype,
        )
        return (new_c, new_h), new_h

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> tuple[Array, Array]:
        """``(c, h)``, each (..., H), for inputs of shape (..., D)."""
        c, h = self._initial_states(rng, input_shape, 2)
        return c, h


class LayerNormGRUCell(_LayerNormCell):
    r"""Layer-normalized GRU cell (Ba, Kiros & Hinton 2016 applied to flax's ``GRUCell``).

    Layer norm of the input projection ``W_x x`` and of the recurrent
    projection ``W_h h``, each over its 3H pre-activations with its own gain
    and bias; the norms' biases take the place of flax's ``b_i*`` and ``b_hn``::

        (r_x, z_x, n_x) = LN(W_x x_t),  (r_h, z_h, n_h) = LN(W_h h_{t-1})
        r = sigma(r_x + r_h),  z = sigma(z_x + z_h)
        n = tanh(n_x + r * n_h),  h_t = (1 - z) * n + z * h_{t-1}

    Scaling every input by a positive constant leaves the outputs unchanged.

    Shapes: x (..., D) per step; carry h (..., H), H = ``features``.

    Attributes:
      features: H, the hidden size.
      gate_fn: activation of the gates (default sigmoid).
      activation_fn: activation of the candidate (default tanh).
      kernel_init: initializer of each gate's block of ``input_kernel`` (D, 3H).
      recurrent_kernel_init: likewise for ``recurrent_kernel`` (H, 3H) (default orthogonal).
      bias_init: initializer of the layer norms' biases (flax's gate biases).
      dtype: dtype of the computation (default: inferred from inputs and params).
      param_dtype: dtype of the parameters.
      carry_init: initializer of h.
      epsilon: added to the variance in each layer norm.
      scale_init: initializer of the layer norms' gains.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (2, 7, 3))
      >>> y, variables = nn.RNN(jnl.LayerNormGRUCell(5)).init_with_output(jax.random.key(1), x)
      >>> y.shape, variables["params"]["cell"]["input_kernel"].shape
      ((2, 7, 5), (3, 15))
    """

    @nn.compact
    def __call__(self, carry: Array, inputs: Array) -> tuple[Array, Array]:
        """One step: ``(h, x) -> (h_t, h_t)``; x (..., D), h (..., H)."""
        h = carry
        self._check_hidden("jaxnorm.linen.LayerNormGRUCell", h)
        input_kernel, recurrent_kernel, _ = self._gate_params(inputs, "gru")
        new_h = core.gru_step(
            h, inputs, input_kernel, recurrent_kernel,
            input_norm=self._norm("input_norm", self.bias_init),
            recurrent_norm=self._norm("recurrent_norm", self.bias_init),
            gate_fn=self.gate_fn, activation_fn=self.activation_fn, dtype=self.dtype,
        )
        return new_h, new_h

    @nn.nowrap
    def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> Array:
        """h (..., H) for inputs of shape (..., D)."""
        (h,) = self._initial_states(rng, input_shape, 1)
        return h


class BatchNormLSTMCell(_Cell):
    r"""Recurrent batch normalization (Cooijmans et al. 2016): an LSTM with per-step batch norm.

    Batch norm of the input projection ``W_x x`` and of the recurrent projection
    ``W_h h`` separately (gains initialized to 0.1, no bias: the gate bias
    carries it), and of the cell state (gain and bias)::

        (i, f, g, o) = BN(W_x x_t) + BN(W_h h_{t-1}) + b
        c_t = sigma(f) * c_{t-1} + sigma(i) * tanh(g)
        h_t = sigma(o) * tanh(BN(c_t))

    Every time step has its own running statistics. Run the cell the flax way,
    scanning the ``batch_stats`` collection over the time axis::

        nn.RNN(cell, variable_axes={"batch_stats": 0}, variable_broadcast="params",
               split_rngs={"params": False})

    so each leaf of ``batch_stats`` has a leading axis of T steps. To evaluate
    sequences longer than those trained on, fit the statistics to the new
    length with :func:`extend_step_stats` (the last step's are repeated, as the
    paper does). One set of statistics shared by every step, the naive use
    that the paper argues against, is ``variable_broadcast=["params",
    "batch_stats"]`` (to ``init`` and to evaluate) with
    ``variable_carry="batch_stats"`` (to train: every step updates them).

    Padding: flax's RNN runs the cell on padded steps too (``seq_lengths`` only
    selects outputs). To keep padding out of the per-step statistics, start
    from ``cell.initialize_carry(key, x[:, 0].shape, seq_lengths=lengths)``
    (passed as ``initial_carry``): the carry then knows each example's length,
    and batch norm masks the steps at or after it. Outputs at padded steps are
    normalized with the valid examples' statistics and are to be ignored.

    Shapes: x (..., D) per step; carry :class:`StepCarry` ``(c, h, step,
    length)``: c and h (..., H), step (...) int32, length (...) int32
    or None.

    Attributes:
      features: H, the hidden size.
      use_running_average: False to train (batch statistics, and the running
        statistics updated with ``mutable=["batch_stats"]``), True to evaluate
        with the running statistics. A field only, as flax's RNN calls
        ``cell(carry, x)``: build the cell with ``use_running_average=not train``.
      momentum: weight on the old running value, ``new = momentum * old +
        (1 - momentum) * batch`` (flax's direction; PyTorch's 0.1 is 0.9 here).
      epsilon: added to the variance.
      gate_fn, activation_fn, kernel_init, recurrent_kernel_init, bias_init,
        dtype, param_dtype, carry_init: as in :class:`LayerNormLSTMCell`.
      scale_init: initializer of the three batch norms' gains (default 0.1,
        the paper's choice: it keeps the tanh and sigmoids out of saturation).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jnl
      >>> x = jax.random.normal(jax.random.key(0), (8, 5, 3))      # (batch, time, features)
      >>> def rnn(train):
      ...     return nn.RNN(jnl.BatchNormLSTMCell(4, use_running_average=not train),
      ...                   variable_axes={"batch_stats": 0}, variable_broadcast="params",
      ...                   split_rngs={"params": False})
      >>> variables = rnn(True).init(jax.random.key(1), x)
      >>> variables["batch_stats"]["cell"]["input_norm"]["mean"].shape    # (T, 4H)
      (5, 16)
      >>> y, upd = rnn(True).apply(variables, x, mutable=["batch_stats"])
      >>> longer = jnp.concatenate([x, x], axis=1)                       # 10 steps
      >>> stats = jnl.extend_step_stats(upd["batch_stats"], 10)
      >>> rnn(False).apply({"params": variables["params"], "batch_stats": stats}, longer).shape
      (8, 10, 4)
    """

    features: int
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    gate_fn: Callable[..., Any] = nn.sigmoid
    activation_fn: Callable[..., Any] = nn.tanh
    kernel_init: Initializer = default_kernel_init
    recurrent_kernel_init: Initializer = initializers.orthogonal()
    bias_init: Initializer = initializers.zeros_init()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    carry_init: Initializer = initializers.zeros_init()
    scale_init: Initializer = initializers.constant(0.1)

    @nn.compact
    def __call__(self, carry: StepCarry, inputs: Array) -> tuple[StepCarry, Array]:
        """One step: ``(carry, x) -> (carry_t, h_t)``; x (..., D)."""
        fn = "jaxnorm.linen.BatchNormLSTMCell"
        if self.use_running_average is None:
            raise ValueError(
                f"{fn}: `use_running_average` is None; it is a field (flax's RNN calls `cell(carry, x)`), so "
                f"build the cell with it, e.g. `BatchNormLSTMCell({self.features}, use_running_average=not train)`."
            )
        use_running_average = checks.check_static_bool(fn, "use_running_average", self.use_running_average)
        if not isinstance(carry, StepCarry):
            raise ValueError(
                f"{fn}: `carry` must be the cell's StepCarry (c, h, step, length), got {type(carry).__name__}; "
                f"build it with `cell.initialize_carry(key, x.shape)` (flax's RNN does so by default)."
            )
        self._check_hidden(fn, carry.h)
        input_kernel, recurrent_kernel, bias = self._gate_params(inputs, "lstm")
        mask = core.valid_steps(carry)
        norm = dict(use_running_average=use_running_average, momentum=self.momentum, epsilon=self.epsilon,
                    scale_init=self.scale_init, bias_init=initializers.zeros_init(), dtype=self.dtype,
                    param_dtype=self.param_dtype)
        input_norm = _BatchNorm(**norm, use_bias=False, name="input_norm")
        recurrent_norm = _BatchNorm(**norm, use_bias=False, name="recurrent_norm")
        cell_norm = _BatchNorm(**norm, use_bias=True, name="cell_norm")
        new_c, new_h = core.lstm_step(
            carry.c, carry.h, inputs, input_kernel, recurrent_kernel, bias,
            input_norm=lambda v: input_norm(v, mask), recurrent_norm=lambda v: recurrent_norm(v, mask),
            cell_norm=lambda v: cell_norm(v, mask),
            gate_fn=self.gate_fn, activation_fn=self.activation_fn, dtype=self.dtype,
        )
        return core.next_step(carry, new_c, new_h), new_h

    @nn.nowrap
    def initialize_carry(
        self, rng: Array, input_shape: tuple[int, ...], *, seq_lengths: Array | None = None
    ) -> StepCarry:
        """A :class:`StepCarry` at step 0 for inputs of shape (..., D).

        Args:
          rng: key for ``carry_init``.
          input_shape: the shape of one step's input, (..., D).
          seq_lengths: optional (...) int lengths: steps at or after them
            are padding and stay out of the statistics. Pass the same lengths
            as ``seq_lengths=`` to the RNN.
        """
        batch = tuple(input_shape[:-1])
        lengths = core.check_lengths("jaxnorm.linen.BatchNormLSTMCell.initialize_carry", seq_lengths, batch)
        c, h = self._initial_states(rng, input_shape, 2)
        return core.init_step_carry(c, h, lengths)


def extend_step_stats(batch_stats: Any, num_steps: int) -> Any:
    """Per-step statistics fitted to ``num_steps`` steps, repeating the last step's beyond those trained.

    ``nn.RNN(BatchNormLSTMCell(...), variable_axes={"batch_stats": 0}, ...)``
    keeps statistics of shape (T, ...) for T steps and only runs on sequences
    of T steps. Cooijmans et al. 2016 evaluate longer sequences with the last
    trained step's statistics for every later step: this gives every leaf
    (T, ...) the shape (num_steps, ...), the first T rows unchanged and the
    last one repeated (or only the first ``num_steps`` rows when it is
    smaller). The input is not modified.

    Args:
      batch_stats: the ``batch_stats`` collection of the RNN (or any subtree
        whose leaves all have the same leading time axis). Statistics of other
        layers (without a time axis) must not be in it.
      num_steps: the sequence length to evaluate.

    Returns:
      The tree with every leaf of leading size ``num_steps``.

    Raises:
      ValueError: ``num_steps`` is not a positive int, a leaf has no leading
        axis, or the leaves' leading axes differ.

    Example:
      >>> import jax.numpy as jnp, jaxnorm.linen as jnl
      >>> stats = {"cell": {"cell_norm": {"mean": jnp.arange(3.0)[:, None] * jnp.ones(2)}}}
      >>> jnl.extend_step_stats(stats, 5)["cell"]["cell_norm"]["mean"][:, 0].tolist()
      [0.0, 1.0, 2.0, 2.0, 2.0]
    """
    return core.extend_steps(batch_stats, num_steps, fn="jaxnorm.linen.extend_step_stats")
