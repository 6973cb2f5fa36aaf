"""jaxnorm's functional core: one concept per module, importing only jax, numpy and each other (never flax).

Dependency order (each module imports only modules above it):

    checks, axes, lowering          validators; axes and layouts; XLA:CPU workarounds per lowering platform
    state                           BatchStats, RecalibrationStats, update rules, the one reset
    collectives                     cross-device merge, grouped sums, shard_map typing
    moments                         shifted, masked moments (public: moments)
    standardize                     the fused op and its custom derivative (forward, backward, one decoration)
    normalize                       the inference-time affine map
    feature_stats                   streaming data-set moments (FeatureStats); PreciseBN's exact fold uses its merge
    per_example                     where a per-example (conditional) scale, bias or condition sits on x
    batch_norm, batch_renorm, layer_norm, group_norm    one norm family each
    adaptive_instance_norm, response_norms              AdaIN; local and filter response norms
    folding, recalibration, torch   inference tools and PyTorch conversion
"""
