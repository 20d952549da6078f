"""The diffusion math: schedules, the denoiser contract, samplers, guidance."""
