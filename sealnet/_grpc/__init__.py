"""Generated gRPC modules for proto/*.proto (scripts/gen_proto.py); do not edit by hand."""
