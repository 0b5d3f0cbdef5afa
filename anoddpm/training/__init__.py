"""Training: the loop, run folder and resume (``train``), one optimisation step of the denoiser (``denoiser_step``),
checkpoints (``checkpointing``), the scoring head's training and check (``head_training``, ``head_phase``,
``head_check``) and the run log (``run_log``). It ends by calibrating the bundle (``anoddpm.detection``)."""
