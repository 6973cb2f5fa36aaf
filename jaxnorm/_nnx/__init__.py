"""Flax NNX layers of jaxnorm, one concept per file; :mod:`jaxnorm.nnx` re-exports them.

``batch_norm`` (BatchNorm, BatchRenorm), ``layer_norm`` (LayerNorm, RMSNorm),
``group_norm`` (GroupNorm, InstanceNorm), ``recalibration`` (recalibrate,
reset_batch_stats), ``common`` (parameter declaration, the per-example norms'
shared state). Nothing here imports :mod:`jaxnorm.linen` or :mod:`jaxnorm._linen`;
what both sides share is :mod:`jaxnorm._flax_common`.
``conditional`` (ConditionalBatchNorm, ConditionalLayerNorm, ConditionalGroupNorm,
ConditionalInstanceNorm) and ``response_norms`` (LocalResponseNorm, FilterResponseNorm).
"""
