"""Train protected models: each method turns a network into a public part plus a secret part."""
