"""jaxnorm: normalization for JAX as pure functions over explicit state.

    import jaxnorm as jn
    stats = jn.init_batch_stats(64)
    y, stats = jn.batch_norm(x, stats, scale, bias, training=True)

Flax layers live in :mod:`jaxnorm.linen` and :mod:`jaxnorm.nnx`, PyTorch
state-dict conversion in :mod:`jaxnorm.interop`. Importing this module loads
no flax. Every name here is re-exported from ``jaxnorm/_src`` (one concept a
file; the README's "Layout of the code" is the map).
"""

from jaxnorm._src.adaptive_instance_norm import adaptive_instance_norm as adaptive_instance_norm
from jaxnorm._src.batch_norm import batch_norm as batch_norm
from jaxnorm._src.batch_renorm import batch_renorm as batch_renorm
from jaxnorm._src.batch_renorm import renorm_schedule as renorm_schedule
from jaxnorm._src.feature_stats import FeatureStats as FeatureStats
from jaxnorm._src.feature_stats import init_feature_stats as init_feature_stats
from jaxnorm._src.feature_stats import merge_feature_stats as merge_feature_stats
from jaxnorm._src.feature_stats import standardize_features as standardize_features
from jaxnorm._src.feature_stats import unstandardize_features as unstandardize_features
from jaxnorm._src.feature_stats import update_feature_stats as update_feature_stats
from jaxnorm._src.folding import FoldPair as FoldPair
from jaxnorm._src.folding import fold_batch_norm as fold_batch_norm
from jaxnorm._src.folding import fold_batch_norms as fold_batch_norms
from jaxnorm._src.folding import fold_spectral_norm as fold_spectral_norm
from jaxnorm._src.group_norm import group_norm as group_norm
from jaxnorm._src.group_norm import instance_norm as instance_norm
from jaxnorm._src.layer_norm import layer_norm as layer_norm
from jaxnorm._src.layer_norm import rms_norm as rms_norm
from jaxnorm._src.moments import moments as moments
from jaxnorm._src.normalize import normalize as normalize
from jaxnorm._src.recalibration import recalibrate as recalibrate
from jaxnorm._src.recurrent import StepCarry as StepCarry
from jaxnorm._src.response_norms import filter_response_norm as filter_response_norm
from jaxnorm._src.response_norms import local_response_norm as local_response_norm
from jaxnorm._src.spectral_norm import init_spectral_state as init_spectral_state
from jaxnorm._src.spectral_norm import spectral_norm as spectral_norm
from jaxnorm._src.state import BatchStats as BatchStats
from jaxnorm._src.state import SpectralState as SpectralState
from jaxnorm._src.state import init_batch_stats as init_batch_stats
from jaxnorm._src.weight_norm import weight_norm as weight_norm
from jaxnorm._src.weight_norm import weight_standardize as weight_standardize

__version__ = "0.1.0"

__all__ = [
    "StepCarry",
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
    "FeatureStats",
    "init_feature_stats",
    "merge_feature_stats",
    "standardize_features",
    "unstandardize_features",
    "update_feature_stats",
    # conditional and batch-free activation norms
    "adaptive_instance_norm",
    "filter_response_norm",
    "local_response_norm",
    "SpectralState",
    "fold_spectral_norm",
    "init_spectral_state",
    "spectral_norm",
    "weight_norm",
    "weight_standardize",
]
