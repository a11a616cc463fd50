"""Model segmentation application: the site's own model folder (MONAI bundle or TorchScript + model.yaml)."""
