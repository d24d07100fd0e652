"""U-Net baselines (filled in by the U-Net issue)."""

UNet_models = {}
