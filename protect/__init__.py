"""Train protected models: each method turns a network into a public part plus a secret part."""

# The anti-piracy transform variants (protect/transform.py); here so the CLI can list them without torch.
VARIANTS = ("fixed", "learned", "generator")
