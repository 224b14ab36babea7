"""Train protected models: each method turns a network into a public part plus a secret part."""

# Names the CLI lists without importing torch.
# The anti-piracy transform variants (protect/transform.py).
VARIANTS = ("fixed", "learned", "generator")
# The passport method (protect/passport.py, protect/passport_train.py).
SCHEMES = ("v1", "v2", "v3")
PASSPORT_TYPES = ("random", "fixed", "shuffled")
PASSPORT_FNS = ("gamma", "beta", "both")
PASSPORT_MODELS = ("alexnet_p", "cnn_p", "resnet18_p")
DEFAULT_SIGNATURE = "sealnet:owner"  # 13 ASCII characters = 104 bits
