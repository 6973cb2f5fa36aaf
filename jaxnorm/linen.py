"""Flax linen layers over the jaxnorm core: drop-in for ``flax.linen``'s norms.

``jaxnorm.linen.BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
``InstanceNorm`` take the constructor fields, defaults and variable names of the
``flax.linen`` layers of the same name, so a model switches by changing its
import. Each ``__call__`` only declares variables and calls the matching core
function once (:func:`jaxnorm.batch_norm`, :func:`jaxnorm.layer_norm`, ...):
every formula lives in ``jaxnorm/_src``.

Variables:

- ``params/scale``, ``params/bias``: gamma and beta, as in flax.
- ``batch_stats/mean``, ``batch_stats/var``: running statistics, as in flax.
- ``batch_stats/count`` (BatchNorm only): int32 number of batches folded into
  the statistics; it makes ``average="cumulative"`` possible and saturates
  instead of wrapping. :func:`from_flax_variables` adds it to a flax checkpoint.

Differences from flax (see the README's "Flax" section):

- The variance is always jaxnorm's stable shifted one (see ``jaxnorm.moments``); ``use_fast_variance``
  is accepted for compatibility and ignored (flax's default one-pass
  ``E[x^2] - E[x]^2`` loses every digit for inputs with a large offset).
  ``force_float32_reductions`` is likewise accepted and ignored: statistics
  always accumulate in at least float32 and running statistics stay float32.
- A batch whose statistics are not finite leaves the running statistics
  unchanged (flax writes the NaN into them).
- Training BatchNorm with one value per feature is an error (flax returns the
  bias); during ``init`` such a batch is normalized with the fresh running
  statistics instead, so ``init`` with a single example still works.

Where things live: the layers in :mod:`jaxnorm._linen` (``batch_norm``,
``layer_norm``, ``group_norm``, ``conditional``, ``response_norms``,
``weight``, ``recurrent``, ``input_normalization``), checkpoint helpers in
``_linen.checkpoint``, PreciseBN in ``_linen.recalibration``, pair detection
for folding in ``_linen.folding``; the fields' core keyword arguments and the
one Flax-side switch in :mod:`jaxnorm._flax_common` (shared with
:mod:`jaxnorm.nnx`). This module only re-exports, in one sorted block.

Recalibration (PreciseBN): :func:`recalibrate`. Nothing in these layers is
ambient: a layer's result depends on its fields, call arguments and
variables only. :func:`fresh_batch_stats` resets the statistics; with
``average="cumulative"`` (a field) and ``count == 0`` the first batch
replaces them and later ones are averaged with equal weight.
"""

from jaxnorm._linen.batch_norm import BatchNorm as BatchNorm
from jaxnorm._linen.batch_norm import BatchRenorm as BatchRenorm
from jaxnorm._linen.checkpoint import fresh_batch_stats as fresh_batch_stats
from jaxnorm._linen.checkpoint import from_flax_variables as from_flax_variables
from jaxnorm._linen.conditional import ConditionalBatchNorm as ConditionalBatchNorm
from jaxnorm._linen.conditional import ConditionalGroupNorm as ConditionalGroupNorm
from jaxnorm._linen.conditional import ConditionalInstanceNorm as ConditionalInstanceNorm
from jaxnorm._linen.conditional import ConditionalLayerNorm as ConditionalLayerNorm
from jaxnorm._linen.folding import batch_norm_pairs as batch_norm_pairs
from jaxnorm._linen.folding import fold_batch_norms as fold_batch_norms
from jaxnorm._linen.group_norm import GroupNorm as GroupNorm
from jaxnorm._linen.group_norm import InstanceNorm as InstanceNorm
from jaxnorm._linen.input_normalization import InputNormalization as InputNormalization
from jaxnorm._linen.input_normalization import adapt as adapt
from jaxnorm._linen.layer_norm import LayerNorm as LayerNorm
from jaxnorm._linen.layer_norm import RMSNorm as RMSNorm
from jaxnorm._linen.recalibration import recalibrate as recalibrate
from jaxnorm._linen.recurrent import BatchNormLSTMCell as BatchNormLSTMCell
from jaxnorm._linen.recurrent import LayerNormGRUCell as LayerNormGRUCell
from jaxnorm._linen.recurrent import LayerNormLSTMCell as LayerNormLSTMCell
from jaxnorm._linen.recurrent import extend_step_stats as extend_step_stats
from jaxnorm._linen.response_norms import FilterResponseNorm as FilterResponseNorm
from jaxnorm._linen.response_norms import LocalResponseNorm as LocalResponseNorm
from jaxnorm._linen.weight import SpectralNorm as SpectralNorm
from jaxnorm._linen.weight import WeightNorm as WeightNorm
from jaxnorm._linen.weight import WeightStandardization as WeightStandardization

__all__ = [
    "BatchNorm",
    "BatchNormLSTMCell",
    "BatchRenorm",
    "ConditionalBatchNorm",
    "ConditionalGroupNorm",
    "ConditionalInstanceNorm",
    "ConditionalLayerNorm",
    "FilterResponseNorm",
    "GroupNorm",
    "InputNormalization",
    "InstanceNorm",
    "LayerNorm",
    "LayerNormGRUCell",
    "LayerNormLSTMCell",
    "LocalResponseNorm",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
    "WeightStandardization",
    "adapt",
    "batch_norm_pairs",
    "extend_step_stats",
    "fold_batch_norms",
    "fresh_batch_stats",
    "from_flax_variables",
    "recalibrate",
]
