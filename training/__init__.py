"""Training: CamVid folders → (image, mask) pairs → joint transforms → U-Net → checkpoint."""
