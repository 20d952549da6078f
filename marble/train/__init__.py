"""The trainer: noise-prediction training of the U-Net, reconstruction training of the VAE."""
