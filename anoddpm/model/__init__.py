"""The networks and the diffusion math: the eps-UNet and its presets (``unet``), schedules, q_sample, DDIM and
ancestral steps and partial-diffusion reconstruction (``diffusion``), per-image intensity normalisation
(``intensity``) and the learned scoring-head network (``head``)."""
