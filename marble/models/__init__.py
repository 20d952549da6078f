"""Networks: the U-Net, the VAE codec, text encoders and their shared layers."""
