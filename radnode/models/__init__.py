"""Model folders a hospital points the node to: MONAI bundles, TorchScript + sidecar YAML, deepbet weights."""
