"""The security testers' suite: attacks against bundles, endpoints and the trusted module."""
