"""The inference endpoint for edge clients: KServe v2 gRPC in front of the trusted module and ONNX Runtime."""
