"""Exporters of cross-stitch models to deployable formats (ONNX, TorchScript, torch.export)."""
