"""Evaluations that deploy bundles (export, then the trusted module and the endpoint) and measure a method."""
