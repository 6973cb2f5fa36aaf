"""Flax linen layers of jaxnorm, one concept per file; :mod:`jaxnorm.linen` re-exports them.

``batch_norm`` (BatchNorm, BatchRenorm), ``layer_norm`` (LayerNorm, RMSNorm),
``group_norm`` (GroupNorm, InstanceNorm), ``checkpoint`` (from_flax_variables,
fresh_batch_stats), ``recalibration`` (recalibrate), ``folding``
(batch_norm_pairs), ``common`` (dtype rule, parameter declaration). The
keyword arguments the layers hand the core and the one Flax-side switch are
in :mod:`jaxnorm._flax_common`, shared with :mod:`jaxnorm._nnx`.
``conditional`` (ConditionalBatchNorm, ConditionalLayerNorm, ConditionalGroupNorm,
ConditionalInstanceNorm) and ``response_norms`` (LocalResponseNorm, FilterResponseNorm).
"""
