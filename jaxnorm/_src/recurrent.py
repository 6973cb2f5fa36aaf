"""Normalized recurrent cells: the step equations and per-step statistics.

The Flax cells (:mod:`jaxnorm._linen.recurrent`, :mod:`jaxnorm._nnx.recurrent`)
hold parameters and statistics and call the functions here; the norms
themselves are :func:`jaxnorm.layer_norm` and :func:`jaxnorm.batch_norm`, passed
in as callables, so no normalization formula lives in this file either.

- :func:`lstm_step`: one step of an LSTM whose input projection ``W_x x``,
  recurrent projection ``W_h h`` and cell state are normalized separately:
  Ba, Kiros & Hinton 2016 (eqs. 20-22) with layer norm, Cooijmans et al. 2016
  (eqs. 6-8) with batch norm::

      (i, f, g, o) = N_x(W_x x_t) + N_h(W_h h_{t-1}) + b
      c_t = sigma(f) * c_{t-1} + sigma(i) * tanh(g)
      h_t = sigma(o) * tanh(N_c(c_t))

  (flax's gate order i, f, g, o; the papers write f, i, o, g.)
- :func:`gru_step`: the same idea on flax's GRU (``GRUCell``)::

      (r_x, z_x, n_x) = N_x(W_x x_t),  (r_h, z_h, n_h) = N_h(W_h h_{t-1})
      r = sigma(r_x + r_h),  z = sigma(z_x + z_h)
      n = tanh(n_x + r * n_h),  h_t = (1 - z) * n + z * h_{t-1}

  The norms' biases take the place of flax's ``b_i*`` and ``b_hn``.
- :class:`StepCarry`: the carry of the batch-normalized cell: ``(c, h)`` plus
  the per-example step index and (optionally) sequence lengths, so that padded
  steps stay out of the per-step statistics (:func:`valid_steps`) and the NNX
  cell can pick the statistics of the current step (:func:`step_slot`).
- :func:`extend_steps`: per-step statistics of T steps fitted to another
  number of steps, repeating the last step's beyond T (Cooijmans et al. 2016,
  section 4: "statistics for time steps beyond T_max are those of T_max").
- :func:`cell_shapes`, :func:`carry_shape`, :func:`per_gate_init`,
  :func:`init_step_stats`: the parameters and state a cell declares, so that
  the Flax cells only name them (the gate count k stands once, in
  :data:`NUM_GATES`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src.state import BatchStats, init_batch_stats

Array = jax.Array
Norm = Callable[[Array], Array]

NUM_GATES = {"lstm": 4, "gru": 3}
"""Gate pre-activations per hidden unit: the LSTM's i, f, g, o and the GRU's r, z, n (flax's orders)."""


class CellShapes(NamedTuple):
    """The parameter shapes of a normalized cell with k gates, D inputs and H hidden units.

    Attributes:
      num_gates: k (:data:`NUM_GATES`).
      input_kernel: (D, kH), the input projection ``W_x``.
      recurrent_kernel: (H, kH), the recurrent projection ``W_h``.
      gates: (kH,): the gate bias ``b`` and the projections' norms' gain and bias.
      hidden: (H,): the cell state's norm's gain and bias.
      bias: (kH,) for the LSTM's gate bias; None for the GRU, whose norms' biases take its place.

    Example:
      >>> cell_shapes("lstm", 3, 5).input_kernel, cell_shapes("gru", 3, 5).bias
      ((3, 20), None)
    """

    num_gates: int
    input_kernel: tuple[int, int]
    recurrent_kernel: tuple[int, int]
    gates: tuple[int]
    hidden: tuple[int]
    bias: tuple[int] | None


def cell_shapes(kind: str, in_features: int, hidden_features: int) -> CellShapes:
    """The :class:`CellShapes` of an ``"lstm"`` or ``"gru"`` cell with D = ``in_features``, H = ``hidden_features``."""
    k = NUM_GATES[kind]
    width = k * hidden_features
    return CellShapes(
        num_gates=k,
        input_kernel=(in_features, width),
        recurrent_kernel=(hidden_features, width),
        gates=(width,),
        hidden=(hidden_features,),
        bias=(width,) if kind == "lstm" else None,
    )


def carry_shape(input_shape: tuple[int, ...], hidden_features: int) -> tuple[int, ...]:
    """(..., H): the shape of ``c`` and ``h`` for one step's input of shape (..., D)."""
    return (*tuple(input_shape)[:-1], hidden_features)


def check_hidden_state(fn: str, h: Array, features: int, *, name: str, fix: str) -> None:
    """The carry's hidden state must have the cell's H features on its last axis."""
    if h.shape[-1] != features:
        raise ValueError(
            f"{fn}: the carry's hidden state has {h.shape[-1]} features (shape {h.shape}), but the cell has "
            f"`{name}`={features}; build the carry with `{fix}`."
        )


class StepCarry(NamedTuple):
    """Carry of a batch-normalized LSTM cell.

    Attributes:
      c: (..., H) cell state.
      h: (..., H) hidden state (the output).
      step: (...) int32: steps taken so far (the index of the next step's
        statistics). Per example so that flax's RNN can select the last valid
        carry of each sequence; every example holds the same value.
      length: (...) int32 sequence lengths, or None (every step counts).
        Steps at or after an example's length are padding: they leave the
        statistics alone.

    Example:
      >>> import jax, jax.numpy as jnp, jaxnorm.linen as jnl
      >>> cell = jnl.BatchNormLSTMCell(4, use_running_average=False)
      >>> carry = cell.initialize_carry(jax.random.key(0), (2, 3))
      >>> carry.c.shape, carry.step.tolist()
      ((2, 4), [0, 0])
    """

    c: Array
    h: Array
    step: Array
    length: Array | None = None


def check_lengths(fn: str, seq_lengths: Any, batch_shape: tuple[int, ...]) -> Array | None:
    """``seq_lengths`` as int32 of the batch shape, or None."""
    if seq_lengths is None:
        return None
    lengths = jnp.asarray(seq_lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer) or lengths.shape != tuple(batch_shape):
        raise ValueError(
            f"{fn}: `seq_lengths` must be an integer array of the batch shape {tuple(batch_shape)}, got "
            f"dtype {lengths.dtype} and shape {lengths.shape}; pass the same `seq_lengths` as to the RNN, "
            f"e.g. `jnp.array([5, 3])` for a batch of 2."
        )
    return lengths.astype(jnp.int32)


def init_step_carry(c: Array, h: Array, seq_lengths: Array | None) -> StepCarry:
    """A fresh :class:`StepCarry` at step 0 around the initial ``c`` and ``h``."""
    return StepCarry(c, h, jnp.zeros(c.shape[:-1], jnp.int32), seq_lengths)


def valid_steps(carry: StepCarry) -> Array | None:
    """(..., 1) bool: True where the current step is inside the sequence; None without lengths."""
    if carry.length is None:
        return None
    return (carry.step < carry.length)[..., None]


def next_step(carry: StepCarry, c: Array, h: Array) -> StepCarry:
    """The carry after one step: new ``c`` and ``h``, the step index advanced (saturating)."""
    limit = jnp.iinfo(jnp.int32).max
    step = jnp.where(carry.step < limit, carry.step + 1, carry.step)
    return StepCarry(c, h, step.astype(jnp.int32), carry.length)


def step_slot(step: Array, max_steps: int) -> Array:
    """() int32: the row of (max_steps, ...) statistics for ``step``; the last one beyond max_steps."""
    return jnp.minimum(jnp.max(step), max_steps - 1).astype(jnp.int32)


def init_step_stats(max_steps: int, feature_shape: tuple[int, ...]) -> BatchStats:
    """Fresh statistics of every step: ``max_steps`` rows of :func:`jaxnorm.init_batch_stats`.

    Shapes: mean and var (max_steps, C...), count (max_steps,) for ``feature_shape`` (C...).
    """
    fresh = init_batch_stats(feature_shape)
    return BatchStats(*(jnp.broadcast_to(a, (max_steps, *a.shape)) for a in fresh))


def step_stats(stats: BatchStats, slot: Array) -> BatchStats:
    """The statistics of one step: row ``slot`` (:func:`step_slot`) of per-step statistics."""
    return BatchStats(stats.mean[slot], stats.var[slot], stats.count[slot])


def with_step_stats(stats: BatchStats, slot: Array, new: BatchStats) -> BatchStats:
    """Per-step statistics with row ``slot`` replaced by ``new``."""
    return BatchStats(stats.mean.at[slot].set(new.mean), stats.var.at[slot].set(new.var),
                      stats.count.at[slot].set(new.count))


def _mm(a: Array, kernel: Array, dtype: Any) -> Array:
    """``a @ kernel`` over the last axis, in flax Dense's dtype rule (promote, or ``dtype``)."""
    dtype = jnp.result_type(a, kernel) if dtype is None else dtype
    return jnp.matmul(a.astype(dtype), kernel.astype(dtype))


def lstm_step(
    c: Array,
    h: Array,
    x: Array,
    input_kernel: Array,
    recurrent_kernel: Array,
    bias: Array,
    *,
    input_norm: Norm,
    recurrent_norm: Norm,
    cell_norm: Norm,
    gate_fn: Callable[[Array], Array],
    activation_fn: Callable[[Array], Array],
    dtype: Any = None,
) -> tuple[Array, Array]:
    """One step of a normalized LSTM: returns ``(c_t, h_t)``.

    Shapes: x (..., D), c and h (..., H), input_kernel (D, 4H),
    recurrent_kernel (H, 4H), bias (4H,); the four gates in flax's order
    i, f, g, o along the last axis. ``input_norm`` and ``recurrent_norm`` map
    (..., 4H) to itself, ``cell_norm`` (..., H) to itself.
    """
    gates = input_norm(_mm(x, input_kernel, dtype)) + recurrent_norm(_mm(h, recurrent_kernel, dtype)) + bias
    i, f, g, o = jnp.split(gates, NUM_GATES["lstm"], axis=-1)
    new_c = gate_fn(f) * c + gate_fn(i) * activation_fn(g)
    new_h = gate_fn(o) * activation_fn(cell_norm(new_c))
    return new_c, new_h


def gru_step(
    h: Array,
    x: Array,
    input_kernel: Array,
    recurrent_kernel: Array,
    *,
    input_norm: Norm,
    recurrent_norm: Norm,
    gate_fn: Callable[[Array], Array],
    activation_fn: Callable[[Array], Array],
    dtype: Any = None,
) -> Array:
    """One step of a normalized GRU: returns ``h_t``.

    Shapes: x (..., D), h (..., H), input_kernel (D, 3H), recurrent_kernel
    (H, 3H), gates r, z, n along the last axis (flax's order).
    """
    r_x, z_x, n_x = jnp.split(input_norm(_mm(x, input_kernel, dtype)), NUM_GATES["gru"], axis=-1)
    r_h, z_h, n_h = jnp.split(recurrent_norm(_mm(h, recurrent_kernel, dtype)), NUM_GATES["gru"], axis=-1)
    r = gate_fn(r_x + r_h)
    z = gate_fn(z_x + z_h)
    n = activation_fn(n_x + r * n_h)
    return (1.0 - z) * n + z * h


def per_gate_init(init: Callable[..., Array], gates: int) -> Callable[..., Array]:
    """An initializer of a (fan_in, gates * H) kernel made of ``gates`` blocks drawn by ``init``.

    flax's cells initialize one (fan_in, H) kernel per gate (an orthogonal
    recurrent kernel is orthogonal per gate, not across all four); this keeps
    that distribution for the fused kernel the normalized cells multiply by once.
    """

    def initializer(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        *lead, width = shape
        keys = jax.random.split(key, gates)
        return jnp.concatenate([init(k, (*lead, width // gates), dtype) for k in keys], axis=-1)

    return initializer


def check_num_steps(fn: str, num_steps: Any, name: str = "num_steps") -> int:
    """A positive Python int."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(
            f"{fn}: `{name}` must be a positive Python int, got {num_steps!r}; pass the number of "
            f"time steps, e.g. `{name}=100`."
        )
    return int(num_steps)


def extend_steps(tree: Any, num_steps: int, *, fn: str = "extend_steps") -> Any:
    """Fits every leaf's leading (time) axis to ``num_steps``.

    A leaf of shape (T, ...) becomes (num_steps, ...): its first ``num_steps``
    rows when ``num_steps <= T``, else all T rows followed by copies of the last
    one. The input is not modified.

    Args:
      tree: a pytree of arrays with a leading time axis (e.g. a ``batch_stats``
        collection scanned by ``nn.RNN(..., variable_axes={"batch_stats": 0})``).
      num_steps: the number of steps wanted.
      fn: the public name for error messages.

    Returns:
      The same tree with every leaf fitted to ``num_steps`` rows.

    Raises:
      ValueError: ``num_steps`` not a positive int, a leaf without a leading
        axis, or leaves whose leading axes differ.
    """
    num_steps = check_num_steps(fn, num_steps)
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        raise ValueError(
            f"{fn}: `batch_stats` holds no arrays; pass the `batch_stats` collection of the RNN whose "
            f"cell keeps per-step statistics, e.g. `variables['batch_stats']`."
        )
    lengths = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{fn}: the leaf {jax.tree_util.keystr(path)} of `batch_stats` has shape (), but per-step "
                f"statistics have a leading time axis; pass only the statistics of an RNN run with "
                f"`variable_axes={{'batch_stats': 0}}` (not those of other layers)."
            )
        lengths.add(shape[0])
    if len(lengths) > 1:
        raise ValueError(
            f"{fn}: the leaves of `batch_stats` have different leading (time) axes {sorted(lengths)}; "
            f"pass the statistics of one RNN (one number of steps), e.g. `variables['batch_stats']['RNN_0']`."
        )

    def fit(leaf: Any) -> Array:
        leaf = jnp.asarray(leaf)
        if num_steps <= leaf.shape[0]:
            return leaf[:num_steps]
        tail = jnp.broadcast_to(leaf[-1:], (num_steps - leaf.shape[0], *leaf.shape[1:]))
        return jnp.concatenate([leaf, tail], axis=0)

    return jax.tree.unflatten(treedef, [fit(leaf) for leaf in leaves])
