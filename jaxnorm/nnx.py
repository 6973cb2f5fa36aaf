"""Flax NNX layers over the jaxnorm core: drop-in for ``flax.nnx``'s norms.

``jaxnorm.nnx.BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
``InstanceNorm`` take the constructor arguments and defaults of the
``flax.nnx`` layers of the same name (``num_features`` first, ``rngs=``) and
hold the same variables: ``nnx.Param`` ``scale``/``bias`` and ``nnx.BatchStat``
``mean``/``var``, plus an int32 ``nnx.BatchStat`` ``count`` on BatchNorm. Each
``__call__`` calls the matching core function once; no formula lives here.

Train/eval switching follows flax: ``model.train()`` / ``model.eval()`` (and
``nnx.view(model, use_running_average=...)``) set the ``use_running_average``
attribute; a ``use_running_average`` given at call time takes precedence.

Recalibration hook (PreciseBN): ``average`` is a plain attribute, so
``nnx.view(model, average="cumulative")`` (or ``model.set_attributes``)
switches every jaxnorm BatchNorm to cumulative averaging without rebuilding the
model and :func:`reset_batch_stats` gives fresh statistics; :func:`recalibrate`
does the whole pass.

Where things live: the layers in :mod:`jaxnorm._nnx` (``batch_norm``,
``layer_norm``, ``group_norm``, ``conditional``, ``response_norms``,
``weight``, ``recurrent``, ``input_normalization``), PreciseBN and the reset
in ``_nnx.recalibration``. This module only re-exports, in one sorted block.

Differences from flax are listed in :mod:`jaxnorm.linen` and the README.
"""

from jaxnorm._nnx.batch_norm import BatchNorm as BatchNorm
from jaxnorm._nnx.batch_norm import BatchRenorm as BatchRenorm
from jaxnorm._nnx.conditional import ConditionalBatchNorm as ConditionalBatchNorm
from jaxnorm._nnx.conditional import ConditionalGroupNorm as ConditionalGroupNorm
from jaxnorm._nnx.conditional import ConditionalInstanceNorm as ConditionalInstanceNorm
from jaxnorm._nnx.conditional import ConditionalLayerNorm as ConditionalLayerNorm
from jaxnorm._nnx.group_norm import GroupNorm as GroupNorm
from jaxnorm._nnx.group_norm import InstanceNorm as InstanceNorm
from jaxnorm._nnx.input_normalization import InputNormalization as InputNormalization
from jaxnorm._nnx.input_normalization import adapt as adapt
from jaxnorm._nnx.layer_norm import LayerNorm as LayerNorm
from jaxnorm._nnx.layer_norm import RMSNorm as RMSNorm
from jaxnorm._nnx.recalibration import recalibrate as recalibrate
from jaxnorm._nnx.recalibration import reset_batch_stats as reset_batch_stats
from jaxnorm._nnx.recurrent import BatchNormLSTMCell as BatchNormLSTMCell
from jaxnorm._nnx.recurrent import LayerNormGRUCell as LayerNormGRUCell
from jaxnorm._nnx.recurrent import LayerNormLSTMCell as LayerNormLSTMCell
from jaxnorm._nnx.response_norms import FilterResponseNorm as FilterResponseNorm
from jaxnorm._nnx.response_norms import LocalResponseNorm as LocalResponseNorm
from jaxnorm._nnx.weight import SpectralNorm as SpectralNorm
from jaxnorm._nnx.weight import WeightNorm as WeightNorm
from jaxnorm._nnx.weight import WeightStandardization as WeightStandardization

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
    "recalibrate",
    "reset_batch_stats",
]
