"""Deployment: ONNX export and the torch-free production-line runtime."""
