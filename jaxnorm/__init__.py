"""jaxnorm: normalization for JAX as pure functions over explicit state.

    import jaxnorm as jn
    stats = jn.init_batch_stats(64)
    y, stats = jn.batch_norm(x, stats, scale, bias, training=True)

Flax layers live in :mod:`jaxnorm.linen` and :mod:`jaxnorm.nnx`, PyTorch
state-dict conversion in :mod:`jaxnorm.interop`. Importing this module loads
no flax. Every name here is re-exported from ``jaxnorm/_src`` (one concept a
file; the README's "Layout of the code" is the map).
"""

from jaxnorm._src.batch_norm import batch_norm as batch_norm
from jaxnorm._src.batch_renorm import batch_renorm as batch_renorm
from jaxnorm._src.batch_renorm import renorm_schedule as renorm_schedule
from jaxnorm._src.folding import FoldPair as FoldPair
from jaxnorm._src.folding import fold_batch_norm as fold_batch_norm
from jaxnorm._src.folding import fold_batch_norms as fold_batch_norms
from jaxnorm._src.group_norm import group_norm as group_norm
from jaxnorm._src.group_norm import instance_norm as instance_norm
from jaxnorm._src.layer_norm import layer_norm as layer_norm
from jaxnorm._src.layer_norm import rms_norm as rms_norm
from jaxnorm._src.moments import moments as moments
from jaxnorm._src.normalize import normalize as normalize
from jaxnorm._src.recalibration import recalibrate as recalibrate
from jaxnorm._src.state import BatchStats as BatchStats
from jaxnorm._src.state import init_batch_stats as init_batch_stats

__version__ = "0.1.0"

__all__ = [
    "BatchStats",
    "FoldPair",
    "batch_norm",
    "batch_renorm",
    "fold_batch_norm",
    "fold_batch_norms",
    "group_norm",
    "init_batch_stats",
    "instance_norm",
    "layer_norm",
    "moments",
    "normalize",
    "recalibrate",
    "renorm_schedule",
    "rms_norm",
]
