"""aecore.export: ONNX export, verification, quantization and a torch-free runtime."""
