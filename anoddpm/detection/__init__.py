"""Inspection: images -> anomaly maps and scores, and everything fitted for it from good images.

``detector`` composes the steps, each in its own module: ``reconstruction`` (partial diffusion, once per batch),
``backbone`` and ``features`` (frozen pretrained features, once per batch), ``components/`` (one module per component
map, each owning its fitted state), ``references`` (map references: nearest_good, good_mean), ``fusion`` (component
scales and how the maps combine), ``maps`` (residual maps, blur, image score). ``calibration`` fits every state and the
threshold from good images; ``tiling`` runs the same detector tile by tile; ``scoring_loop`` batches images through
it; ``settings`` and ``guard`` make sure a threshold only judges the settings it was calibrated for."""
