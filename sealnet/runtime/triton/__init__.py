"""Serving a bundle through NVIDIA Triton Inference Server: the model repository (`repo`), the Python-backend
models that run the shared runtime pipeline inside Triton (`backend`, `public`), and the helper that starts
tritonserver (`server`)."""
