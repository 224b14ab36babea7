"""Benchmarks: sealnet's serving cost against plain ONNX Runtime and KServe (`sealnet bench`)."""
