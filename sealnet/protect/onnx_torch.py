"""An ONNX graph turned into a trainable torch network, whatever the method or architecture.

A user's `.onnx` model is fine-tuned this way (its sealed head; its public part on public data), and a thief
does the same with a bundle's public.onnx: every weight of the graph becomes a parameter that can be trained,
and the graph can be cut at any tensor (e.g. before the last fully connected layer, to put a new head there).
Only the operators sealnet's exported networks use are interpreted; any other is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(attrs: dict, spatial: int = 2) -> tuple[int, ...]:
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    if pads[:spatial] != pads[spatial:]:
        raise ValueError(f"asymmetric padding {pads} is not supported")
    return tuple(pads[:spatial])


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):  # noqa: N803 - ONNX attribute names
    a = a.t() if transA else a
    b = b.t() if transB else b
    out = alpha * (a @ b)
    return out if c is None else out + beta * c


def _reshape(x, shape):
    dims = [int(d) for d in shape.tolist()]
    dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _axes(node_attrs: dict, inputs: list, index: int):
    if len(inputs) > index and inputs[index] is not None:
        return [int(a) for a in inputs[index].tolist()]
    return list(node_attrs.get("axes", []))


def _run(op: str, inputs: list, attrs: dict):
    x = inputs[0] if inputs else None
    if op == "Conv":
        bias = inputs[2] if len(inputs) > 2 else None
        return F.conv2d(x, inputs[1], bias, stride=tuple(attrs.get("strides", (1, 1))), padding=_pads(attrs),
                        dilation=tuple(attrs.get("dilations", (1, 1))), groups=attrs.get("group", 1))
    if op in ("Relu", "Sigmoid", "Tanh"):
        return {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh}[op](x)
    if op == "MaxPool":
        return F.max_pool2d(x, tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", attrs["kernel_shape"])),
                            _pads(attrs), ceil_mode=bool(attrs.get("ceil_mode", 0)))
    if op == "AveragePool":
        return F.avg_pool2d(x, tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", attrs["kernel_shape"])),
                            _pads(attrs), ceil_mode=bool(attrs.get("ceil_mode", 0)),
                            count_include_pad=bool(attrs.get("count_include_pad", 0)))
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if op == "Flatten":
        axis = attrs.get("axis", 1)
        return x.reshape(math.prod(x.shape[:axis]), -1)
    if op == "Reshape":
        return _reshape(x, inputs[1])
    if op == "Gemm":
        return _gemm(*inputs, **attrs)
    if op == "MatMul":
        return x @ inputs[1]
    if op in ("Add", "Sub", "Mul", "Div"):
        return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](x, inputs[1])
    if op == "BatchNormalization":
        # running statistics are never trained (the exporter may alias them with an equal weight tensor)
        return F.batch_norm(x, inputs[3].detach(), inputs[4].detach(), inputs[1], inputs[2], training=False,
                            eps=attrs.get("epsilon", 1e-5))
    if op == "Concat":
        return torch.cat(inputs, dim=attrs["axis"])
    if op == "Shape":
        return torch.tensor(x.shape, dtype=torch.int64)
    if op == "Gather":
        return torch.index_select(x, attrs.get("axis", 0), inputs[1].reshape(-1).long()).reshape(inputs[1].shape
                                                                                                  + x.shape[1:])
    if op == "Unsqueeze":
        for axis in sorted(_axes(attrs, inputs, 1)):
            x = x.unsqueeze(axis)
        return x
    if op == "Squeeze":
        axes = _axes(attrs, inputs, 1)
        return x.squeeze(tuple(axes)) if axes else x.squeeze()
    if op == "ReduceMean":
        axes = _axes(attrs, inputs, 1)
        return x.mean(dim=tuple(axes), keepdim=bool(attrs.get("keepdims", 1)))
    if op == "Transpose":
        return x.permute(*attrs["perm"])
    if op in ("Identity", "Dropout"):
        return x
    if op == "Cast":
        return x.to({1: torch.float32, 7: torch.int64}[attrs["to"]])
    if op == "Softmax":
        return F.softmax(x, dim=attrs.get("axis", -1))
    raise ValueError(f"ONNX operator {op!r} is not supported by the rebuild")


class OnnxModule(nn.Module):
    """public.onnx as an nn.Module: floating-point initializers are trainable parameters (batch-norm running
    statistics stay fixed buffers), the forward pass interprets the graph up to `output` (default: its output)."""

    def __init__(self, model: onnx.ModelProto, output: str | None = None):
        super().__init__()
        graph = model.graph
        initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.input_name = next(i.name for i in graph.input if i.name not in initializers)
        self.output_name = output or graph.output[0].name
        self.nodes = _needed(graph, self.output_name)
        stats = {n.input[k] for n in self.nodes if n.op_type == "BatchNormalization" for k in (3, 4)}
        self.weights = nn.ParameterList()
        self._slots: dict[str, tuple[str, int]] = {}
        constants: list[torch.Tensor] = []
        used = {name for n in self.nodes for name in n.input}
        for name, value in initializers.items():
            if name not in used:
                continue
            tensor = torch.from_numpy(np.array(value, copy=True))
            if tensor.is_floating_point() and name not in stats:
                self._slots[name] = ("w", len(self.weights))
                self.weights.append(nn.Parameter(tensor))
            else:
                self._slots[name] = ("c", len(constants))
                self.register_buffer(f"const_{len(constants)}", tensor)
                constants.append(tensor)

    def named_onnx_weights(self) -> dict[str, nn.Parameter]:
        return {name: self.weights[i] for name, (kind, i) in self._slots.items() if kind == "w"}

    def forward(self, x: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """overrides: initializers replaced by these tensors for this pass (e.g. passport gamma/beta computed by
        a trainable block, so gradients reach it)."""
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for name, (kind, i) in self._slots.items():
            env[name] = self.weights[i] if kind == "w" else getattr(self, f"const_{i}")
        env.update(overrides or {})
        for node in self.nodes:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                env[node.output[0]] = torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"]), copy=True))
                continue
            inputs = [env[name] if name else None for name in node.input]
            result = _run(node.op_type, inputs, attrs)
            env[node.output[0]] = result
        return env[self.output_name]

    def reinitialize(self, seed: int) -> OnnxModule:
        """The same architecture with fresh weights (torch's default initialisation): the from-scratch control."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.weights:
                if p.dim() >= 2:
                    fan_in = p.shape[1] * math.prod(p.shape[2:])
                    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), as nn.Conv2d / nn.Linear
                    p.uniform_(-bound, bound, generator=gen)
                elif p.dim() == 1:
                    p.uniform_(-0.05, 0.05, generator=gen)
        return self


def _needed(graph: onnx.GraphProto, output: str) -> list[onnx.NodeProto]:
    """The nodes that `output` depends on, in graph order."""
    producer = {out: node for node in graph.node for out in node.output}
    if output not in producer:
        raise ValueError(f"no ONNX node produces {output!r}")
    wanted, stack = set(), [output]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in wanted:
            continue
        wanted.add(id(node))
        stack.extend(i for i in node.input if i)
    return [n for n in graph.node if id(n) in wanted]


def penultimate(model: onnx.ModelProto) -> tuple[str, int]:
    """The tensor feeding the graph's last fully connected layer, and its width: where a thief puts a new head.
    A graph that does not end in one (a sealed-head backbone) is cut at its output."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    name = graph.output[0].name
    node = producer.get(name)
    if node is not None and node.op_type == "Add" and node.input[0] in producer \
            and producer[node.input[0]].op_type == "MatMul":
        node = producer[node.input[0]]
    if node is not None and node.op_type in ("Gemm", "MatMul"):
        weights = {i.name: i for i in graph.initializer}
        w = weights.get(node.input[1])
        if w is not None:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
            return node.input[0], int(w.dims[1] if trans_b else w.dims[0])
    dims = graph.output[0].type.tensor_type.shape.dim
    return name, math.prod(int(d.dim_value) for d in dims[1:])  # features of any rank are flattened


def with_weights(model: onnx.ModelProto, module: OnnxModule) -> onnx.ModelProto:
    """A copy of `model` whose initializers hold `module`'s current (e.g. fine-tuned) weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = module.named_onnx_weights()
    for init in out.graph.initializer:
        if init.name in weights:
            value = weights[init.name].detach().cpu().numpy().astype(numpy_helper.to_array(init).dtype)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return out
