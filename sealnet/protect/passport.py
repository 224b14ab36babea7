"""Passport layers (Fan, Ng & Chan): gamma = Avg(W * P_gamma), beta = Avg(W * P_beta), output gamma*O(Wx) + beta.

A passport layer is a convolution (or linear) layer followed by a normalisation without affine parameters
(BatchNorm for scheme V1, GroupNorm for the multi-task schemes V2/V3) whose scale and shift are *derived*
from the layer's own weight W and a secret passport P shaped like the layer's input (C_in x H x W):

    gamma_o = mean_{h,w} (W * P_gamma)[o, h, w]      beta_o = mean_{h,w} (W * P_beta)[o, h, w]

with the convolution's stride and padding. The three passport functions of the Digital Passport paper:
  "gamma" (paper's V1): gamma from a passport, beta a trainable parameter;
  "beta"  (paper's V2): beta from a passport, gamma a trainable parameter;
  "both"  (paper's V3): gamma and beta from passports (also Algorithm 1 of the extended paper; the default).

Passports are non-persistent buffers: they never appear in `state_dict()`, so a model's state dict is exactly
its public weights, and passports travel separately (`get_passports` / `set_passports`). The signature is
carried by sign(gamma) of the passport branch and embedded with the sign loss sum_i max(gamma0 - gamma_i b_i, 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sealnet.protect import PASSPORT_FNS, PASSPORT_TYPES, SCHEMES

GAMMA0 = 0.1

Passports = dict[str, dict[str, torch.Tensor]]  # layer name -> {"gamma": P_gamma, "beta": P_beta}
Params = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (gamma, beta)


def scheme_norm(scheme: str) -> str:
    """V1 uses BatchNorm; V2/V3 train two branches on shared weights, where BN's running stats break: GroupNorm."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return "bn" if scheme == "v1" else "gn"


def gn_groups(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= max_groups that divides `channels`, keeping >= 2 channels per group if possible."""
    for g in range(min(max_groups, max(channels // 2, 1)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def make_norm(kind: str, channels: int, affine: bool, dims: int = 2) -> nn.Module:
    if kind == "bn":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels, affine=affine)
    if kind == "gn":
        return nn.GroupNorm(gn_groups(channels), channels, affine=affine)
    raise ValueError(f"unknown norm {kind!r}; choose bn or gn")


class PassportLayer(nn.Module):
    """Shared machinery: passport buffers, the passport function, public affine branch and overrides."""

    def __init__(self, out_channels: int, norm: str, passport_fn: str, public_affine: bool, dims: int):
        super().__init__()
        if passport_fn not in PASSPORT_FNS:
            raise ValueError(f"unknown passport function {passport_fn!r}; choose one of {', '.join(PASSPORT_FNS)}")
        self.out_channels = out_channels
        self.passport_fn = passport_fn
        self.norm_kind = norm
        self.norm = make_norm(norm, out_channels, affine=False, dims=dims)
        # Filled by init_passport_shapes (the shape of this layer's input, without the batch dimension).
        self.register_buffer("passport_gamma", torch.empty(0), persistent=False)
        self.register_buffer("passport_beta", torch.empty(0), persistent=False)
        if passport_fn == "gamma":
            self.beta = nn.Parameter(torch.zeros(out_channels))
        if passport_fn == "beta":
            self.gamma = nn.Parameter(torch.ones(out_channels))
        self.public_affine = public_affine
        if public_affine:  # schemes V2/V3: the distributed network runs on these, no passport needed
            self.public_gamma = nn.Parameter(torch.ones(out_channels))
            self.public_beta = nn.Parameter(torch.zeros(out_channels))
        self.use_passport = True
        self.passport_set = False  # True once set_passports installed real passports
        self.override: tuple[torch.Tensor, torch.Tensor] | None = None
        self._probe_shape: tuple[int, ...] | None = None

    # -- the passport function ----------------------------------------------------------------------------
    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def avg_response(self, passport: torch.Tensor) -> torch.Tensor:
        """Avg(W * P): the layer's linear map applied to one passport, averaged over space -> (C_out,)."""
        return self.avg_response_batch(passport.unsqueeze(0))[0]

    def avg_response_batch(self, passports: torch.Tensor) -> torch.Tensor:
        """Avg(W * P) for a batch of passports (K, *passport_shape) -> (K, C_out)."""
        raise NotImplementedError

    @property
    def passport_shape(self) -> tuple[int, ...]:
        return tuple(self.passport_gamma.shape)

    def passport_params(self, passport_gamma: torch.Tensor | None = None,
                        passport_beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta) of the passport branch, from the given passports or the stored ones."""
        if (passport_gamma is None or passport_beta is None) and not self.passport_set:
            raise RuntimeError("passport layer has no passport: install one with set_passports, or supply "
                               "gamma/beta (use_params / ExplicitParamsModel)")
        pg = self.passport_gamma if passport_gamma is None else passport_gamma
        pb = self.passport_beta if passport_beta is None else passport_beta
        if self.passport_fn in ("gamma", "both"):
            gamma = self.avg_response(pg)
        else:
            gamma = self.gamma
        if self.passport_fn in ("beta", "both"):
            beta = self.avg_response(pb)
        else:
            beta = self.beta
        return gamma, beta

    def scale_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.override is not None:
            return self.override
        if not self.use_passport:
            if not self.public_affine:
                raise RuntimeError("this passport layer has no public affine branch (scheme V1)")
            return self.public_gamma, self.public_beta
        return self.passport_params()

    def signature_gamma(self) -> torch.Tensor:
        """The gamma whose signs carry the signature: the passport branch's (trainable gamma for fn 'beta')."""
        return self.passport_params()[0]

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        """gamma * y + beta; gamma/beta are (C,) or, one per sample, (N, C) (training against many fakes)."""
        gamma, beta = self.scale_bias()
        tail = (1,) * (y.dim() - 2)
        gamma = gamma.reshape((-1, self.out_channels) + tail) if gamma.dim() == 2 else gamma.reshape((1, -1) + tail)
        beta = beta.reshape((-1, self.out_channels) + tail) if beta.dim() == 2 else beta.reshape((1, -1) + tail)
        return gamma * y + beta


class PassportConv2d(PassportLayer):
    """conv (no bias) -> normalisation without affine -> gamma * . + beta, gamma/beta from passports."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 norm: str = "bn", passport_fn: str = "both", public_affine: bool = False):
        super().__init__(out_channels, norm, passport_fn, public_affine, dims=2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)

    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def avg_response_batch(self, passports: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(passports, self.conv.weight, None, self.conv.stride, self.conv.padding)
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._probe_shape is not None:  # init_passport_shapes: record the input shape only
            self._probe_shape = tuple(x.shape[1:])
            return self.norm(self.conv(x))
        return self._affine(self.norm(self.conv(x)))


class PassportLinear(PassportLayer):
    """linear (no bias) -> normalisation without affine -> gamma * . + beta; the passport is a vector (in_features,)."""

    def __init__(self, in_features: int, out_features: int, norm: str = "bn", passport_fn: str = "both",
                 public_affine: bool = False):
        super().__init__(out_features, norm, passport_fn, public_affine, dims=1)
        self.linear = nn.Linear(in_features, out_features, bias=False)

    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def avg_response_batch(self, passports: torch.Tensor) -> torch.Tensor:
        return F.linear(passports.reshape(len(passports), -1), self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._probe_shape is not None:
            self._probe_shape = tuple(x.shape[1:])
            return self.norm(self.linear(x))
        return self._affine(self.norm(self.linear(x)))




# -- model-level helpers -----------------------------------------------------------------------------------
def passport_layers(model: nn.Module) -> dict[str, PassportLayer]:
    """The model's passport layers by module name, in forward (registration) order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PassportLayer)}


@torch.no_grad()
def init_passport_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Run a dummy input once to learn each passport layer's input shape, and allocate zero passports."""
    layers = passport_layers(model)
    for layer in layers.values():
        layer._probe_shape = ()
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
    for name, layer in layers.items():
        shape = layer._probe_shape
        layer._probe_shape = None
        if not shape:
            raise RuntimeError(f"passport layer {name} was not reached by a forward pass")
        layer.passport_gamma = torch.zeros(shape)
        layer.passport_beta = torch.zeros(shape)


def passport_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: layer.passport_shape for name, layer in passport_layers(model).items()}


def signature_capacity(model: nn.Module) -> int:
    """Number of signature bits the model can carry: one per output channel of every passport layer."""
    return sum(layer.out_channels for layer in passport_layers(model).values())


def get_passports(model: nn.Module) -> Passports:
    return {name: {"gamma": layer.passport_gamma.detach().clone(), "beta": layer.passport_beta.detach().clone()}
            for name, layer in passport_layers(model).items()}


def set_passports(model: nn.Module, passports: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Install passports; every passport layer must get one of exactly its input shape."""
    layers = passport_layers(model)
    missing = sorted(set(layers) - set(passports))
    extra = sorted(set(passports) - set(layers))
    if missing or extra:
        raise ValueError(f"passports do not fit the model: missing layers {missing}, unknown layers {extra}")
    for name, layer in layers.items():
        for key in ("gamma", "beta"):
            p = torch.as_tensor(passports[name][key], dtype=torch.float32)
            if tuple(p.shape) != layer.passport_shape:
                raise ValueError(f"passport {name}.{key} has shape {tuple(p.shape)}, the layer expects "
                                 f"{layer.passport_shape}")
            setattr(layer, f"passport_{key}", p.clone().to(layer.weight().device))
        layer.passport_set = True


def compute_params(model: nn.Module, passports: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Params:
    """(gamma, beta) per passport layer from the public weights and the passports (stored ones if None).

    This is what the trusted module computes for scheme V1: gamma = Avg(W * P_gamma), beta = Avg(W * P_beta).
    """
    out: Params = {}
    for name, layer in passport_layers(model).items():
        if passports is None:
            out[name] = layer.passport_params()
        else:
            pg = torch.as_tensor(passports[name]["gamma"], dtype=torch.float32)
            pb = torch.as_tensor(passports[name]["beta"], dtype=torch.float32)
            out[name] = layer.passport_params(pg, pb)
    return out


@contextlib.contextmanager
def use_params(model: nn.Module, params: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Run the model with explicit (gamma, beta) per passport layer (deployment path, attacks)."""
    layers = passport_layers(model)
    saved = {name: layer.override for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer.override = params[name]
        yield
    finally:
        for name, layer in layers.items():
            layer.override = saved[name]


@contextlib.contextmanager
def use_passports(model: nn.Module, passports: Mapping[str, Mapping[str, torch.Tensor]]) -> Iterator[None]:
    """Temporarily install other passports (e.g. a fake) and restore the model's own afterwards."""
    saved = get_passports(model)
    flags = {name: layer.passport_set for name, layer in passport_layers(model).items()}
    set_passports(model, passports)
    try:
        yield
    finally:
        set_passports(model, saved)
        for name, layer in passport_layers(model).items():
            layer.passport_set = flags[name]


# The two branches of a passport network (as in the papers): through the passports, or (V2/V3) the public gamma/beta.
PASSPORT_BRANCH, PUBLIC_BRANCH = "passport", "public"


@contextlib.contextmanager
def passport_branch(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Schemes V2/V3: True runs the passport (private) branch, False the public gamma/beta branch."""
    layers = passport_layers(model)
    saved = {name: layer.use_passport for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.use_passport = enabled
        yield
    finally:
        for name, layer in layers.items():
            layer.use_passport = saved[name]


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Forward passes that use batch statistics but leave BatchNorm running statistics untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum in zip(bns, saved, strict=True):
            m.momentum = momentum


def signature_gammas(model: nn.Module) -> torch.Tensor:
    """All passport layers' signature gammas, concatenated in layer order."""
    return torch.cat([layer.signature_gamma().reshape(-1) for layer in passport_layers(model).values()])


@torch.no_grad()
def extract_bits(model: nn.Module, passports: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> np.ndarray:
    """Signature detection (Algorithm 5): sign(gamma) as +1/-1 int8, gamma computed from the passports."""
    if passports is None:
        g = signature_gammas(model)
    else:
        with use_passports(model, passports):
            g = signature_gammas(model)
    return np.where(g.cpu().numpy() >= 0, 1, -1).astype(np.int8)


def random_params(model: nn.Module, generator: torch.Generator, k: int, scale: float = 1.0) -> Params:
    """(gamma, beta) of k independent U[-1,1] passports per layer, batched as (k, C_out) each.

    A parameter that does not come from a passport (fn 'gamma': beta; fn 'beta': gamma) is the layer's own.
    """
    out: Params = {}
    for name, layer in passport_layers(model).items():
        shape = (k, *layer.passport_shape)
        dev = layer.weight().device
        gamma = beta = None
        if layer.passport_fn in ("gamma", "both"):
            gamma = layer.avg_response_batch(((torch.rand(shape, generator=generator) * 2 - 1) * scale).to(dev))
        if layer.passport_fn in ("beta", "both"):
            beta = layer.avg_response_batch(((torch.rand(shape, generator=generator) * 2 - 1) * scale).to(dev))
        own_gamma, own_beta = (layer.gamma, layer.beta) if layer.passport_fn != "both" else (None, None)
        out[name] = (gamma if gamma is not None else own_gamma.expand(k, -1),
                     beta if beta is not None else own_beta.expand(k, -1))
    return out


def decorrelation_loss(model: nn.Module, fake: Params, share: float = 4.0,
                       keys: tuple[str, ...] = ("gamma", "beta")) -> torch.Tensor:
    """Keeps the passport map isotropic around the true gamma/beta; `fake` from `random_params`.

    gamma(P) = M P is linear in P. Training only ever moves W along the true passport's direction (the gradient
    of gamma w.r.t. M is rank one, (dL/dgamma) P^T), so with the papers' loss M becomes nearly rank one and
    aligned with the true gamma: a random passport then yields +-c * gamma_true (half the time the right signs),
    and the top left singular vector of M, computable from the public weights alone, *is* gamma's direction
    (measured: |cos| 0.99 on every layer; reverse engineering started there recovers the accuracy and all
    signature bits). For isotropic random passports p, E cos^2(M p, g) = |M^T g_hat|^2 / |M|_F^2, which is
    1/C_out when M has no preferred direction. The term, per layer and per passport-derived parameter t, is
    relu(log(C_out * mean_k cos^2(M p_k, t) / share)): zero once the true direction carries no more than `share`
    times an average direction's share of M's energy, and on a log scale so that it still pulls when cos^2 is
    already small.
    """
    terms = []
    for name, layer in passport_layers(model).items():
        true = layer.passport_params()
        for i, key in enumerate(("gamma", "beta")):
            if key not in keys or layer.passport_fn not in (key, "both"):
                continue
            cos2 = F.cosine_similarity(fake[name][i], true[i].unsqueeze(0), dim=1).pow(2).mean()
            terms.append(F.relu(torch.log(layer.out_channels * cos2 / share + 1e-12)))
    return torch.stack(terms).sum() if terms else torch.zeros(())


def sign_loss(gammas: torch.Tensor, bits: torch.Tensor, gamma0: float = GAMMA0) -> torch.Tensor:
    """R = sum_i max(gamma0 - gamma_i b_i, 0) with b in {-1, +1} (Eq. 6 of the extended paper).

    The designated bits cover the first len(bits) channels (in passport-layer order); the rest are free."""
    return F.relu(gamma0 - gammas[: len(bits)] * bits.to(gammas.dtype)).sum()


# -- signatures ---------------------------------------------------------------------------------------------
def signature_to_bits(signature: str, capacity: int | None = None) -> np.ndarray:
    """ASCII -> bits (8 per character, most significant first) as +1/-1 int8; error if it does not fit."""
    try:
        raw = signature.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("the signature must be ASCII text") from None
    if not raw:
        raise ValueError("the signature is empty")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8)).astype(np.int8) * 2 - 1
    if capacity is not None and len(bits) > capacity:
        raise ValueError(f"signature {signature!r} needs {len(bits)} bits but the passport layers carry only "
                         f"{capacity} (one per channel; at most {capacity // 8} characters)")
    return bits


def bits_to_signature(bits: np.ndarray) -> str:
    """+1/-1 (or 1/0) bits -> text; bytes that are not printable ASCII show as '?'."""
    b = (np.asarray(bits).reshape(-1) > 0).astype(np.uint8)
    b = b[: len(b) // 8 * 8]
    raw = np.packbits(b).tobytes()
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in raw)


def signature_bits(signature: str, capacity: int, seed: int = 0, pad: bool = False) -> np.ndarray:
    """The designated sign string: the signature's bits, then (pad=True) seeded pseudo-random bits up to
    `capacity`, so that the sign loss fixes every channel's sign (costs accuracy; off by default)."""
    sig = signature_to_bits(signature, capacity)
    if not pad:
        return sig
    extra = np.random.default_rng([seed, 0x5EA1]).integers(0, 2, capacity - len(sig)).astype(np.int8) * 2 - 1
    return np.concatenate([sig, extra]).astype(np.int8)


# -- passports ------------------------------------------------------------------------------------------------
def random_passports(model: nn.Module, generator: torch.Generator, scale: float = 1.0) -> Passports:
    """Passport type T1: every element independently uniform in [-scale, scale] (the papers: scale 1)."""
    return {name: {key: (torch.rand(shape, generator=generator) * 2 - 1) * scale for key in ("gamma", "beta")}
            for name, shape in passport_shapes(model).items()}


@torch.no_grad()
def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of the named modules when `model` runs on x (eval mode)."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        if name not in modules:
            raise ValueError(f"feature model has no module {name!r}")
        hooks.append(modules[name].register_forward_pre_hook(
            lambda _m, inp, name=name: captured.__setitem__(name, inp[0].detach().clone())))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def image_passports(model: nn.Module, images: torch.Tensor, generator: torch.Generator,
                    feature_model: nn.Module | None = None, shuffle: bool = True) -> Passports:
    """Passport types T2 (fixed image) and T3 (random-shuffled images) from the papers.

    The images run through `feature_model` (a trained network of the same architecture, e.g. the plain
    counterpart trained as the baseline; by default the passport model itself, layer by layer) and each
    passport is the feature map at the input of its layer. T2 (`shuffle=False`): images[0] gives every
    gamma passport and images[1] every beta passport (one image for both would force gamma == beta).
    T3 (`shuffle=True`): for each layer and each of gamma/beta one of the N images is picked at random.
    """
    names = list(passport_layers(model))
    if len(images) < 2:
        raise ValueError("image passports need at least 2 images")
    if shuffle:
        picks = {name: {key: int(torch.randint(len(images), (1,), generator=generator))
                        for key in ("gamma", "beta")} for name in names}
    else:
        picks = {name: {"gamma": 0, "beta": 1} for name in names}
    if feature_model is not None:
        feats = layer_inputs(feature_model, names, images)
        return {n: {k: feats[n][i].clone() for k, i in picks[n].items()} for n in names}
    # The passport model itself: a layer's input depends on the passports of the layers before it.
    current = random_passports(model, generator)
    with use_passports(model, current):
        for name in names:
            feats = layer_inputs(model, [name], images)[name]
            current[name] = {k: feats[i].clone() for k, i in picks[name].items()}
            set_passports(model, current)
    return current


def make_passports(model: nn.Module, kind: str, generator: torch.Generator, images: torch.Tensor | None = None,
                   feature_model: nn.Module | None = None, scale: float = 1.0) -> Passports:
    if kind == "random":
        return random_passports(model, generator, scale)
    if kind in ("fixed", "shuffled"):
        if images is None:
            raise ValueError(f"passport type {kind!r} needs images")
        return image_passports(model, images, generator, feature_model, shuffle=kind == "shuffled")
    raise ValueError(f"unknown passport type {kind!r}; choose one of {', '.join(PASSPORT_TYPES)}")


# -- deployment ---------------------------------------------------------------------------------------------------
class ExplicitParamsModel(nn.Module):
    """forward(x, gamma_1, beta_1, ..., gamma_L, beta_L): the public network with gamma/beta as inputs.

    What `public.onnx` should be for scheme V1: the passports never enter the graph; the trusted module
    computes (gamma, beta) = compute_params(public weights, passports) and hands them to the runtime.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layer_names = list(passport_layers(model))

    def input_names(self) -> list[str]:
        names = ["input"]
        for i in range(len(self.layer_names)):
            names += [f"gamma_{i}", f"beta_{i}"]
        return names

    def forward(self, x: torch.Tensor, *gamma_beta: torch.Tensor) -> torch.Tensor:
        if len(gamma_beta) != 2 * len(self.layer_names):
            raise ValueError(f"expected {2 * len(self.layer_names)} gamma/beta tensors, got {len(gamma_beta)}")
        params = {name: (gamma_beta[2 * i], gamma_beta[2 * i + 1]) for i, name in enumerate(self.layer_names)}
        with use_params(self.model, params):
            return self.model(x)


class PublicBranchModel(nn.Module):
    """Schemes V2/V3: the distributed network (public gamma/beta, no passport), e.g. for ONNX export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with passport_branch(self.model, False):
            return self.model(x)
