"""Configuration: the frozen dataclasses saved in every checkpoint, bundle and ONNX file (``schema``), their type
and range checks (``checks``) and the generated reference table of docs/usage.md (``reference``). No torch."""
from anoddpm.config.schema import (AUGMENTATIONS, BACKBONE_STAGES, BETA_SCHEDULES, COMPONENTS, CONDITIONS,
                                   DEFAULT_COMPONENTS, FUSIONS, INTENSITY_MODES, LEGACY_DETECT, LOSSES,
                                   MAP_REFERENCES, NOISE_KINDS, PRESETS, RESIDUAL_NORMS, RESIDUALS, RESIZE_POLICIES,
                                   SAMPLERS, SCORE_REDUCTIONS, SCORERS, BackboneConfig, Config, DataConfig,
                                   DetectConfig, DiffusionConfig, HeadConfig, ModelConfig, TrainConfig,
                                   scorer_components)
from anoddpm.config.files import load_config_file

__all__ = ["AUGMENTATIONS", "BACKBONE_STAGES", "BETA_SCHEDULES", "COMPONENTS", "CONDITIONS", "DEFAULT_COMPONENTS",
           "FUSIONS", "INTENSITY_MODES", "LEGACY_DETECT", "LOSSES", "MAP_REFERENCES", "NOISE_KINDS", "PRESETS",
           "RESIDUAL_NORMS", "RESIDUALS", "RESIZE_POLICIES", "SAMPLERS", "SCORE_REDUCTIONS", "SCORERS",
           "BackboneConfig", "Config", "DataConfig", "DetectConfig", "DiffusionConfig", "HeadConfig", "ModelConfig",
           "TrainConfig", "load_config_file", "scorer_components"]
