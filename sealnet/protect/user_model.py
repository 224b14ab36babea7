"""Models users bring: an `nn.Module` from their own Python file (or timm), or an `.onnx` file, cut in two at a
named layer: the public part (input -> features) and the part after it (features -> logits).

A cut is valid where exactly one tensor crosses it (no skip connection jumps over it). Torch models are cut
with torch.fx (names are module paths such as `layer4`); ONNX models with `onnx.utils.Extractor` (names are
tensor names). Both halves come back as trainable torch modules and export to ONNX bytes.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from sealnet.errors import InvalidArgument, MissingExtra


class ModelError(InvalidArgument, ValueError):
    """A user's model (file, factory, weights, split name) cannot be used as given; the message says why."""


@dataclass(frozen=True)
class Cut:
    """A place the model can be split: the public part ends at `name`, whose output is `shape` per item."""

    name: str
    shape: tuple[int, ...]
    public_macs: int  # multiply-accumulates of convolutions and linear layers up to the cut, per item
    head_macs: int  # ... after it

    @property
    def head_share(self) -> float:
        return self.head_macs / max(self.public_macs + self.head_macs, 1)


class SplitModel:
    """Both halves of a cut model, trainable: `public` maps inputs to features, `head` features to logits."""

    def __init__(self, user: UserModel, cut: Cut, public: nn.Module, head: nn.Module):
        self.spec, self.name, self.cut, self.input_shape = user.spec, user.name, cut, tuple(user.input_shape)
        self.public, self.head = public, head

    @property
    def features_shape(self) -> tuple[int, ...]:
        return self.cut.shape

    def public_onnx(self) -> bytes:
        """The public part with its current weights, input `input`, output `features`, dynamic batch."""
        raise NotImplementedError

    def head_onnx(self) -> bytes:
        """The head with its current weights, input `features`, output `logits`, dynamic batch."""
        raise NotImplementedError


class UserModel:
    """A user's whole network, with the places it can be split."""

    spec: str
    input_shape: tuple[int, ...]
    num_outputs: int
    pretrained_cfg: dict[str, Any] | None = None  # timm's input size / mean / std, where the model has one

    @property
    def name(self) -> str:
        """A model id stem: the factory's file and name, timm's model name, or the .onnx file's stem."""
        import re

        kind, _, rest = self.spec.partition(":")
        if kind == "timm":
            stem = rest
        elif self.spec.endswith(".onnx"):
            stem = Path(self.spec).stem
        else:
            file, _, factory = self.spec.rpartition(":")
            stem = f"{Path(file).stem}-{factory}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "user-model"

    def cuts(self) -> list[Cut]:
        raise NotImplementedError

    def default_cut(self) -> Cut:
        raise NotImplementedError

    def split(self, name: str | None = None) -> SplitModel:
        raise NotImplementedError

    def find_cut(self, name: str | None) -> Cut:
        """The cut called `name` (None: the default); an error listing the valid names otherwise."""
        if name is None:
            return self.default_cut()
        cuts = self.cuts()
        found = next((c for c in cuts if c.name == name), None) or self._alias(name)
        if found is None:
            listed = ", ".join(c.name for c in cuts[:40]) + (" ..." if len(cuts) > 40 else "")
            raise ModelError(f"--split-at {name!r} is not a place {self.spec} can be split (one tensor must cross "
                             f"it); valid names: {listed}  (`sealnet inspect --model {self.spec}` lists them)")
        return found

    def _alias(self, name: str) -> Cut | None:
        return None


# -- loading ---------------------------------------------------------------------------------------------------
def open_user_model(spec: str, *, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                    weights: Path | None = None, seed: int = 0) -> UserModel:
    """Resolve `spec`: FILE.py:FACTORY, timm:NAME or FILE.onnx. `input_shape` (C, H, W) is needed for torch
    models unless timm's config gives one; `num_classes`, when given, is checked against the model's outputs
    (and passed to a factory or timm that takes it). Torch models are built after seeding torch with `seed`, so
    weights the factory initialises at random are the same for the same seed."""
    if spec.endswith(".onnx"):
        if weights is not None:
            raise ModelError("--weights applies to torch models; an .onnx file carries its own weights")
        return OnnxUserModel(Path(spec), num_classes)
    torch.manual_seed(seed)
    module, cfg = _torch_module(spec, num_classes, input_shape)
    if weights is not None:
        load_weights(module, weights)
    shape = tuple(input_shape) if input_shape else tuple(cfg.get("input_size", ())) if cfg else ()
    if len(shape) != 3:
        raise ModelError(f"{spec}: the input shape is unknown; pass --data (its images give it) or "
                         "--input-shape C H W")
    return TorchUserModel(module, spec, shape, num_classes, cfg)


def _torch_module(spec: str, num_classes: int | None, input_shape: tuple[int, ...] | None
                  ) -> tuple[nn.Module, dict[str, Any] | None]:
    kind, _, name = spec.partition(":")
    if kind == "timm" and name:
        if importlib.util.find_spec("timm") is None:
            raise MissingExtra("--model timm:NAME needs timm (pip install timm, beside a torchvision that matches "
                               "your torch)")
        import timm

        kwargs: dict[str, Any] = {"pretrained": False}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if input_shape:
            kwargs["in_chans"] = input_shape[0]
        try:
            module = timm.create_model(name, **kwargs)
        except RuntimeError as exc:  # timm's "Unknown model"
            raise ModelError(f"--model {spec}: {exc}") from None
        return module, dict(getattr(module, "pretrained_cfg", {}) or {})
    path, sep, factory = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not factory:
        raise ModelError(f"--model {spec!r}: expected FILE.py:FACTORY, timm:NAME or FILE.onnx")
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"--model {spec}: {file} not found")
    module_name = f"sealnet_user_model_{abs(hash(str(file.resolve())))}"
    loader = importlib.util.spec_from_file_location(module_name, file)
    code = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = code  # dataclasses and pickling look modules up by name
    try:
        loader.loader.exec_module(code)  # the user's own file, named by the user: run like `python FILE`
    except Exception as exc:  # noqa: BLE001 - any failure in the user's file is reported as theirs
        raise ModelError(f"--model {spec}: importing {file} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(code, factory, None)
    if not callable(fn):
        raise ModelError(f"--model {spec}: {file} has no function {factory!r}")
    params = inspect.signature(fn).parameters
    kwargs = {"num_classes": num_classes} if num_classes is not None and "num_classes" in params else {}
    try:
        module = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"--model {spec}: {factory}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"--model {spec}: {factory}() returned {type(module).__name__}, not a torch.nn.Module")
    return module, None


def load_weights(module: nn.Module, path: Path) -> None:
    """A state_dict from .pt/.pth (torch.load, weights only; a {"state_dict": ...} or {"model": ...} wrapper is
    unwrapped) or .safetensors, loaded strictly: every key and shape must match."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--weights {path}: file not found")
    if path.suffix == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise MissingExtra("--weights FILE.safetensors needs the safetensors package (pip install safetensors)")
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several types for foreign files
            raise ModelError(f"--weights {path}: not a torch state_dict file ({type(exc).__name__}: {exc})") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--weights {path}: expected a state_dict (names -> tensors)")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 ", ".join(f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}" for k in wrong[:5])]
        raise ModelError(f"--weights {path} do not match the model: " + "; ".join(p for p in parts if p))
    module.load_state_dict(state)


def _check_outputs(spec: str, got: int, num_classes: int | None) -> None:
    if num_classes is not None and got != num_classes:
        raise ModelError(f"--model {spec} outputs {got} scores but the data has {num_classes} classes; give the "
                         f"model {num_classes} outputs (a factory taking num_classes= receives it)")


# -- torch models: torch.fx ------------------------------------------------------------------------------------
def _conv_linear_macs(module: nn.Module, out_shape: torch.Size) -> int:
    items = math.prod(out_shape[1:])
    if isinstance(module, nn.modules.conv._ConvNd):
        return items * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return items * module.in_features
    return 0


class TorchUserModel(UserModel):
    def __init__(self, module: nn.Module, spec: str, input_shape: tuple[int, ...], num_classes: int | None,
                 pretrained_cfg: dict[str, Any] | None = None):
        from torch.fx.passes.shape_prop import ShapeProp

        self.spec, self.input_shape, self.pretrained_cfg = spec, tuple(input_shape), pretrained_cfg
        self.module = module.eval()
        try:
            self.graph_module = torch.fx.symbolic_trace(self.module)
        except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable code
            raise ModelError(f"--model {spec}: torch.fx cannot trace the model ({type(exc).__name__}: {exc}); "
                             "make its forward free of data-dependent Python control flow, or export it to "
                             ".onnx and pass that") from None
        try:
            with torch.no_grad():
                ShapeProp(self.graph_module).propagate(torch.zeros(1, *self.input_shape))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"--model {spec} does not run on inputs of shape {list(self.input_shape)} "
                             f"({type(exc).__name__}: {exc})") from None
        self.nodes = list(self.graph_module.graph.nodes)
        out = self.nodes[-1].args[0]
        meta = getattr(out, "meta", {}).get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or len(meta.shape) != 2:
            raise ModelError(f"--model {spec}: the model must return one [batch, classes] tensor")
        self.num_outputs = int(meta.shape[1])
        _check_outputs(spec, self.num_outputs, num_classes)
        self._cuts, self._aliases, self._node_of = self._find_cuts()

    def _find_cuts(self) -> tuple[list[Cut], dict[str, Cut], dict[str, torch.fx.Node]]:
        modules = dict(self.module.named_modules())
        index = {n: i for i, n in enumerate(self.nodes)}
        macs = [_conv_linear_macs(modules[n.target], n.meta["tensor_meta"].shape)
                if n.op == "call_module" and "tensor_meta" in n.meta else 0 for n in self.nodes]
        total = sum(macs)
        end: dict[str, torch.fx.Node] = {}  # module path -> the last node computed inside it
        for node in self.nodes:
            for key, value in node.meta.get("nn_module_stack", {}).items():
                path = value[0] if isinstance(value, tuple) else key
                if path:
                    end[path] = node
        cuts: list[Cut] = []
        aliases: dict[str, Cut] = {}
        node_of: dict[str, torch.fx.Node] = {}
        by_node: dict[torch.fx.Node, Cut] = {}
        for path in modules:
            node = end.get(path)
            if node is None or not self._single_tensor_boundary(node, index):
                continue
            if node in by_node:
                aliases[path] = by_node[node]
                continue
            public = sum(macs[: index[node] + 1])
            cut = Cut(path, tuple(int(d) for d in node.meta["tensor_meta"].shape[1:]), public, total - public)
            by_node[node] = cut
            node_of[path] = node
            cuts.append(cut)
        cuts.sort(key=lambda c: index[node_of[c.name]])
        return cuts, aliases, node_of

    def _single_tensor_boundary(self, node: torch.fx.Node, index: dict) -> bool:
        """True when `node` is the only value computed up to it that anything after it reads, it is a tensor,
        and something other than the output follows it (the head must not be empty)."""
        k = index[node]
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or k + 1 >= len(self.nodes) - 1:
            return False
        for earlier in self.nodes[: k + 1]:
            if earlier is node or earlier.op == "get_attr":
                continue
            if any(index[user] > k for user in earlier.users):
                return False
        return True

    def cuts(self) -> list[Cut]:
        return list(self._cuts)

    def _alias(self, name: str) -> Cut | None:
        return self._aliases.get(name)

    def default_cut(self) -> Cut:
        """The last cut before the last layer with weights (the classifier): the head is the classifier."""
        if not self._cuts:
            raise ModelError(f"--model {self.spec}: no layer output is a single-tensor boundary to split at")
        modules = dict(self.module.named_modules())
        index = {n: i for i, n in enumerate(self.nodes)}
        weighted = [index[n] for n in self.nodes if n.op == "call_module"
                    and any(True for _ in modules[n.target].parameters(recurse=False))]
        last = weighted[-1] if weighted else len(self.nodes)
        before = [c for c in self._cuts if index[self._node_of[c.name]] < last]
        return before[-1] if before else self._cuts[-1]

    def split(self, name: str | None = None) -> SplitModel:
        cut = self.find_cut(name)
        node = self._node_of[cut.name]
        k = self.nodes.index(node)
        public_graph, env = torch.fx.Graph(), {}
        for n in self.nodes[: k + 1]:
            env[n] = public_graph.node_copy(n, lambda a: env[a])
        public_graph.output(env[node])
        head_graph = torch.fx.Graph()
        henv = {node: head_graph.placeholder("features")}

        def arg(a: torch.fx.Node) -> torch.fx.Node:
            if a not in henv:  # a get_attr before the cut (the boundary check allows no other)
                henv[a] = head_graph.node_copy(a, lambda b: henv[b])
            return henv[a]

        for n in self.nodes[k + 1 :]:
            if n.op == "output":
                head_graph.output(torch.fx.graph.map_arg(n.args[0], arg))
            else:
                henv[n] = head_graph.node_copy(n, arg)
        # deep copies: the halves train separately and never share a weight with each other or the user's model
        public = torch.fx.GraphModule(copy.deepcopy(self.module), public_graph).eval()
        head = torch.fx.GraphModule(copy.deepcopy(self.module), head_graph).eval()
        return TorchSplit(self, cut, public, head)


class TorchSplit(SplitModel):
    def _export(self, module: nn.Module, shape: tuple[int, ...], what: str, **kwargs: Any) -> bytes:
        from sealnet.protect.onnx_export import export_onnx

        buffer = io.BytesIO()
        try:
            export_onnx(module, (torch.zeros(1, *shape),), buffer, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types for unsupported layers
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelError(f"--model {self.spec}: its {what} cannot be exported to ONNX "
                             f"({type(exc).__name__}: {first})") from None
        return buffer.getvalue()

    def public_onnx(self) -> bytes:
        from sealnet.protect.onnx_export import FEATURES_NAME, INPUT_NAME

        return self._export(self.public, self.input_shape, "public part", input_names=[INPUT_NAME], fold=False,
                            output_name=FEATURES_NAME)

    def head_onnx(self) -> bytes:
        from sealnet.protect.onnx_export import FEATURES_NAME

        return self._export(self.head, self.features_shape, "head", input_names=[FEATURES_NAME])


# -- ONNX models: onnx.utils.Extractor -------------------------------------------------------------------------
def _static_dims(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The non-batch dimensions when all are fixed numbers, else None."""
    dims = value.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims[1:]):
        return None
    return tuple(int(d.dim_value) for d in dims[1:])


class OnnxUserModel(UserModel):
    def __init__(self, path: Path, num_classes: int | None):
        self.spec = str(path)
        if not path.is_file():
            raise ModelError(f"--model {path}: file not found")
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
            self.model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        except Exception as exc:  # noqa: BLE001 - onnx raises several types for bad files
            raise ModelError(f"--model {path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from None
        graph = self.model.graph
        weights = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in weights]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ModelError(f"--model {path}: expected one input and one output, got {len(inputs)} and "
                             f"{len(graph.output)}")
        self.input_name, self.output_name = inputs[0].name, graph.output[0].name
        shape = _static_dims(inputs[0])
        if shape is None or len(shape) != 3:
            dims = [d.dim_value or d.dim_param or "?" for d in inputs[0].type.tensor_type.shape.dim]
            raise ModelError(f"--model {path}: input {self.input_name!r} has shape {dims}; only the batch "
                             "dimension may be dynamic (re-export with a fixed image size: [N, C, H, W])")
        self.input_shape = shape
        out = _static_dims(graph.output[0])
        if out is None or len(out) != 1:
            raise ModelError(f"--model {path}: the output must be [batch, classes] with a fixed class count")
        self.num_outputs = out[0]
        _check_outputs(self.spec, self.num_outputs, num_classes)
        self.shapes = {v.name: v for v in (*graph.value_info, *graph.output)}
        self.weights = {i.name: i for i in graph.initializer}
        self._cuts = self._find_cuts()

    def _macs(self, node: onnx.NodeProto) -> int:
        out = self.shapes.get(node.output[0])
        dims = _static_dims(out) if out is not None else None
        w = self.weights.get(node.input[1]) if len(node.input) > 1 else None
        if dims is None or w is None:
            return 0
        items = math.prod(dims)
        if node.op_type == "Conv":
            return items * math.prod(w.dims[1:])
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            return items * int(w.dims[1] if trans_b else w.dims[0])
        if node.op_type == "MatMul":
            return items * int(w.dims[0])
        return 0

    def _find_cuts(self) -> list[Cut]:
        nodes = list(self.model.graph.node)
        macs = [self._macs(n) for n in nodes]
        total = sum(macs)
        produced_at = {self.input_name: -1}
        for i, n in enumerate(nodes):
            if n.op_type != "Constant":  # constants are copied wherever they are needed
                for out in n.output:
                    produced_at[out] = i
        last_read = {name: -1 for name in produced_at}
        for i, n in enumerate(nodes):
            for name in n.input:
                if name in last_read:
                    last_read[name] = max(last_read[name], i)
        last_read[self.output_name] = len(nodes)
        cuts = []
        for i, n in enumerate(nodes[:-1]):
            if len(n.output) != 1 or n.op_type == "Constant":
                continue
            name = n.output[0]
            value = self.shapes.get(name)
            if value is None or value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                continue
            dims = _static_dims(value)
            crossing = [t for t, at in produced_at.items() if at <= i and last_read[t] > i]
            if dims is None or crossing != [name]:
                continue
            public = sum(macs[: i + 1])
            cuts.append(Cut(name, dims, public, total - public))
        return cuts

    def cuts(self) -> list[Cut]:
        return list(self._cuts)

    def default_cut(self) -> Cut:
        if not self._cuts:
            raise ModelError(f"--model {self.spec}: no tensor is a single-tensor boundary with a fixed shape; "
                             "it cannot be split")
        nodes = list(self.model.graph.node)
        weighted = [i for i, n in enumerate(nodes) if n.op_type in ("Conv", "Gemm", "MatMul") and self._macs(n)]
        order = {n.output[0]: i for i, n in enumerate(nodes)}
        last = weighted[-1] if weighted else len(nodes)
        before = [c for c in self._cuts if order[c.name] < last]
        return before[-1] if before else self._cuts[-1]

    def split(self, name: str | None = None) -> SplitModel:
        from sealnet.protect.onnx_export import FEATURES_NAME, INPUT_NAME, OUTPUT_NAME
        from sealnet.protect.onnx_torch import OnnxModule

        cut = self.find_cut(name)
        extractor = onnx.utils.Extractor(self.model)
        public = _renamed(extractor.extract_model([self.input_name], [cut.name]),
                          {self.input_name: INPUT_NAME, cut.name: FEATURES_NAME})
        head = _renamed(extractor.extract_model([cut.name], [self.output_name]),
                        {cut.name: FEATURES_NAME, self.output_name: OUTPUT_NAME})
        for part, what in ((public, "public part"), (head, "head")):
            _check_batching(part, what, self.spec)
        return OnnxSplit(self, cut, OnnxModule(public), OnnxModule(head), public, head)


def _renamed(model: onnx.ModelProto, names: dict[str, str]) -> onnx.ModelProto:
    """Rename tensors, drop inferred shapes of inner tensors, make every input and output's batch dimension
    dynamic (ONNX Runtime infers the rest again)."""
    for node in model.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in (*model.graph.input, *model.graph.output):
        value.name = names.get(value.name, value.name)
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    return model


def _check_batching(model: onnx.ModelProto, what: str, spec: str) -> None:
    from sealnet.onnx_session import ort_session

    session = ort_session(model.SerializeToString())
    feed = {}
    for value in session.get_inputs():
        feed[value.name] = np.zeros([2, *value.shape[1:]], np.float32)
    try:
        session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime reports shape errors as several types
        raise ModelError(f"--model {spec}: its {what} does not run on a batch of 2 ({type(exc).__name__}); "
                         "re-export the model with a dynamic batch dimension") from None


class OnnxSplit(SplitModel):
    def __init__(self, user: UserModel, cut: Cut, public: nn.Module, head: nn.Module,
                 public_proto: onnx.ModelProto, head_proto: onnx.ModelProto):
        super().__init__(user, cut, public, head)
        self._protos = {"public": public_proto, "head": head_proto}

    def _bytes(self, part: str, module: nn.Module) -> bytes:
        from sealnet.protect.onnx_torch import with_weights

        return with_weights(self._protos[part], module).SerializeToString()

    def public_onnx(self) -> bytes:
        return self._bytes("public", self.public)

    def head_onnx(self) -> bytes:
        return self._bytes("head", self.head)


def onnx_weights_digest(model_bytes: bytes) -> str:
    """sha256 over the sorted initializers (name, dtype, shape, bytes) of an ONNX graph: what a public file
    publishes, recomputed by the export from the file it writes."""
    import hashlib

    from onnx import numpy_helper

    h = hashlib.sha256()
    model = onnx.load_from_string(model_bytes)
    for init in sorted(model.graph.initializer, key=lambda i: i.name):
        a = numpy_helper.to_array(init)
        header = f"{init.name}|{a.dtype.str}|{list(a.shape)}".encode()
        h.update(len(header).to_bytes(8, "little") + header)
        data = np.ascontiguousarray(a).tobytes()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()
