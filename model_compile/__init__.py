"""Turning a trained ONNX model into a verified model bundle the device can trust."""
