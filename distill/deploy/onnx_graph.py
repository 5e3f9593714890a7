"""BatchNorm folding on an exported ONNX graph (`distill export`, distill/deploy/export.py): no BatchNormalization node
is left. The TorchScript exporter already folds Conv -> BN; fold_batchnorm folds the rest where a neighbour
absorbs it exactly (the BatchNorm1d after the fc into the Gemm, a BN before a Gemm into its input side) and
turns any BN no neighbour can absorb exactly (IResNet's pre-activation bn1, before a zero-padded conv) into
Mul + Add. The Identity nodes the exporter writes for shared weights are made plain initialisers first."""

from __future__ import annotations

import numpy as np


def _bn_affine(bn, inits: dict) -> tuple:
    """(scale, shift) of an inference BatchNormalization: y = x * scale + shift per channel."""
    from onnx import numpy_helper

    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    gamma, beta, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in bn.input[1:5])
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _attr(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node, name, value) -> None:
    from onnx import helper

    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


class _Graph:
    """Producer/consumer maps and initializers of an ONNX graph, rebuilt after each rewrite."""

    def __init__(self, graph):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {out: n for n in graph.node for out in n.output}
        self.consumers = {}
        for n in graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def only_consumer(self, tensor, op_type):
        """The node consuming `tensor` when it is the only one and of `op_type` (tensor not a graph output)."""
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == op_type and tensor not in self.outputs:
            return users[0]
        return None

    def array(self, name):
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name]).astype(np.float64) if name in self.inits else None

    def add_init(self, array, base: str) -> str:
        from onnx import numpy_helper

        name, i = f"{base}_bnfolded", 0
        while name in self.inits or name in self.producer:
            i += 1
            name = f"{base}_bnfolded{i}"
        tensor = numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name


def _fold_into_conv(g: _Graph, bn, scale, shift) -> bool:
    """Conv -> BN: scale the conv's output channels, shift its bias."""
    conv = g.producer.get(bn.input[0])
    if conv is None or conv.op_type != "Conv" or g.only_consumer(bn.input[0], "BatchNormalization") is not bn:
        return False
    w = g.array(conv.input[1])
    bias = g.array(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(len(scale))
    if w is None or bias is None or w.shape[0] != len(scale):
        return False
    w_name = g.add_init(w * scale.reshape(-1, *[1] * (w.ndim - 1)), conv.input[1])
    b_name = g.add_init(bias * scale + shift,
                        conv.input[2] if len(conv.input) > 2 and conv.input[2] else f"{conv.name}.bias")
    conv.input[:] = [conv.input[0], w_name, b_name]
    conv.output[0] = bn.output[0]
    return True


def _gemm_parts(g: _Graph, gemm):
    """(B as (K, N) float64, C broadcast to (N,), alpha, beta) of a Gemm with constant B/C, or None."""
    if _attr(gemm, "transA", 0):
        return None
    b = g.array(gemm.input[1])
    if b is None or b.ndim != 2:
        return None
    b = b.T if _attr(gemm, "transB", 0) else b
    n = b.shape[1]
    c = np.zeros(n)
    if len(gemm.input) > 2 and gemm.input[2]:
        c = g.array(gemm.input[2])
        if c is None or c.size not in (1, n):
            return None
        c = np.broadcast_to(c.reshape(-1), (n,)).copy()
    return b, c, float(_attr(gemm, "alpha", 1.0)), float(_attr(gemm, "beta", 1.0))


def _write_gemm(g: _Graph, gemm, b, c) -> None:
    """Give a Gemm new weights B (K, N) (stored transposed, as torch writes Linear) and bias C, alpha = beta = 1."""
    b_name = g.add_init(b.T, gemm.input[1])
    c_name = g.add_init(c, gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else f"{gemm.name}.bias")
    gemm.input[:] = [gemm.input[0], b_name, c_name]
    for name, value in (("transB", 1), ("alpha", 1.0), ("beta", 1.0)):
        _set_attr(gemm, name, value)


def _fold_into_gemm_output(g: _Graph, bn, scale, shift) -> bool:
    """Gemm -> BN (a Linear followed by BatchNorm1d, the embedding layer): scale B's columns and C."""
    gemm = g.producer.get(bn.input[0])
    if gemm is None or gemm.op_type != "Gemm" or g.only_consumer(bn.input[0], "BatchNormalization") is not bn:
        return False
    parts = _gemm_parts(g, gemm)
    if parts is None or parts[0].shape[1] != len(scale):
        return False
    b, c, alpha, beta = parts
    _write_gemm(g, gemm, alpha * b * scale, (beta * c) * scale + shift)
    gemm.output[0] = bn.output[0]
    return True


def _fold_into_gemm_input(g: _Graph, bn, scale, shift) -> bool:
    """BN -> Flatten -> Gemm (IResNet's bn2 before its fc): input feature k of the Gemm is channel k // (H*W)."""
    flatten = g.only_consumer(bn.output[0], "Flatten")
    if flatten is None or _attr(flatten, "axis", 1) != 1:
        return False
    gemm = g.only_consumer(flatten.output[0], "Gemm")
    if gemm is None or gemm.input[0] != flatten.output[0]:
        return False
    parts = _gemm_parts(g, gemm)
    if parts is None or parts[0].shape[0] % len(scale):
        return False
    b, c, alpha, beta = parts
    per_channel = b.shape[0] // len(scale)
    s, t = np.repeat(scale, per_channel), np.repeat(shift, per_channel)
    _write_gemm(g, gemm, alpha * b * s[:, None], beta * c + alpha * (t @ b))
    flatten.input[0] = bn.input[0]
    return True


def _as_mul_add(g: _Graph, bn, scale, shift, rank: int | None) -> bool:
    """A BatchNorm no neighbour can absorb exactly (IResNet's, before a zero-padded conv: the padding is
    not normalised) becomes the same per-channel affine map as Mul + Add."""
    from onnx import helper

    if not rank or rank < 2:
        return False
    shape = (1, len(scale)) + (1,) * (rank - 2)
    s_name = g.add_init(scale.reshape(shape), f"{bn.name or bn.output[0]}.scale")
    t_name = g.add_init(shift.reshape(shape), f"{bn.name or bn.output[0]}.shift")
    mid = f"{bn.output[0]}_scaled"
    index = list(g.graph.node).index(bn)
    g.graph.node.insert(index, helper.make_node("Mul", [bn.input[0], s_name], [mid], name=f"{bn.name}_mul"))
    g.graph.node.insert(index + 1, helper.make_node("Add", [mid, t_name], [bn.output[0]], name=f"{bn.name}_add"))
    return True


def fold_batchnorm(proto) -> dict:
    """Remove every BatchNormalization node of an inference ONNX graph, in place; the arithmetic is unchanged.

    The TorchScript exporter (do_constant_folding, eval mode) already folds a BatchNorm that follows a
    convolution; what it leaves is folded here: BN after a Gemm (BatchNorm1d on the embedding, after the
    fc: VarGFaceNet and IResNet `features`), BN before Flatten -> Gemm (IResNet's bn2), a Conv -> BN it
    missed; any other BN (IResNet's pre-activation bn1, whose 3x3 convolution pads with zeros *after* the
    normalisation, so no weight change reproduces it at the borders) is written as Mul + Add.
    Returns {"folded": n, "mul_add": m, "left": k} (k BatchNorms without constant statistics stay)."""
    import onnx

    ranks = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if vi.type.tensor_type.HasField("shape"):
                ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    except Exception:  # noqa: BLE001 - without shapes only the Mul + Add rewrite is skipped
        pass
    counts = {"folded": 0, "mul_add": 0, "left": 0}
    graph = proto.graph
    _materialise_constants(graph)
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        g = _Graph(graph)
        if len(bn.output) != 1 or any(name not in g.inits for name in bn.input[1:5]):
            counts["left"] += 1
            continue
        scale, shift = _bn_affine(bn, g.inits)
        if _fold_into_conv(g, bn, scale, shift) or _fold_into_gemm_output(g, bn, scale, shift) \
                or _fold_into_gemm_input(g, bn, scale, shift):
            counts["folded"] += 1
        elif _as_mul_add(g, bn, scale, shift, ranks.get(bn.input[0])):
            counts["mul_add"] += 1
        else:
            counts["left"] += 1
            continue
        graph.node.remove(bn)
    _drop_unused_initializers(graph)
    return counts


def _materialise_constants(graph) -> None:
    """Constant nodes, and the Identity nodes the exporter writes for initializers of equal value (shared
    copies: a BatchNorm1d's zero bias and mean may be Identity outputs), become plain initializers."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        tensor = None
        if node.op_type == "Identity" and node.input[0] in inits:
            tensor = numpy_helper.to_array(inits[node.input[0]])
        elif node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = numpy_helper.to_array(helper.get_attribute_value(node.attribute[0]))
        if tensor is not None:
            new = numpy_helper.from_array(tensor, node.output[0])
            graph.initializer.append(new)
            inits[new.name] = new
            graph.node.remove(node)


def _drop_unused_initializers(graph) -> None:
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    dropped = {t.name for t in unused}
    for t in unused:
        graph.initializer.remove(t)
    for vi in [vi for vi in graph.input if vi.name in dropped]:  # IR < 4 files list weights as inputs too
        graph.input.remove(vi)


def split_prelu(proto) -> int:
    """Rewrite every PRelu(x, slope) with a constant slope as Relu(x) + slope * Min(x, 0), in place; returns how
    many. The same numbers bit for bit (x > 0: x + slope * 0; x <= 0: 0 + slope * x), but ONNX Runtime's CPU
    PRelu broadcasts the per-channel slope with a generic kernel, several times slower than the four vectorised
    ops, and PReLU is a large part of full VarGFaceNet's time (docs/measurements.md)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    zero = "facedistill.zero"
    count, nodes = 0, []
    for node in graph.node:
        if node.op_type != "PRelu" or node.input[1] not in inits:
            nodes.append(node)
            continue
        # base: a short name, since the INT8 file repeats names
        x, slope, y, base = node.input[0], node.input[1], node.output[0], f"prelu{count}"
        nodes += [helper.make_node("Relu", [x], [f"{base}.pos"], name=f"{base}.relu"),
                  helper.make_node("Min", [x, zero], [f"{base}.neg"], name=f"{base}.min"),
                  helper.make_node("Mul", [f"{base}.neg", slope], [f"{base}.scaled"], name=f"{base}.mul"),
                  helper.make_node("Add", [f"{base}.pos", f"{base}.scaled"], [y], name=f"{base}.add")]
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
    return count


def shorten_names(graph) -> None:
    """Give every node and every tensor but the graph's inputs and outputs a short name (n<i>, t<i>), in place.
    The exporter's names (`/stage2/block1/conv_dw/Conv_output_0`) are repeated by the quantizer in every Q/DQ
    node and scale around them: about 390 KB of a 6 MB INT8 VarGFaceNet are names. Nothing else changes."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    mapping = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return mapping.setdefault(name, f"t{len(mapping)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for i, node in enumerate(graph.node):
        node.name = f"n{i}"
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for info in graph.value_info:
        info.name = short(info.name)
