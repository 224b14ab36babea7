"""The trusted module: a sealed gRPC service over a simulated TPM keystore.

It alone holds the secret half of a protected model. It checks licenses, and applies the secret input
transform to raw inputs; the untrusted runtime never sees the secret parameters.
"""
