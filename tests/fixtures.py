"""Small ONNX models built with onnx.helper, written once and shared by every test.

Each builder takes a numpy Generator and returns an onnx.ModelProto with random weights (BatchNorm left
unfolded, with non-trivial statistics) whose numerics onnxruntime gives us as the reference.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Accumulates nodes and initializers; every node gets a readable name."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, name: str, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
             bias: bool = False) -> str:
        fan_in = cin // groups * k * k
        w = self.const(f"{name}.w", self.rng.normal(0, (2 / fan_in) ** 0.5, (cout, cin // groups, k, k)).astype(np.float32))
        inputs = [x, w]
        if bias:
            inputs.append(self.const(f"{name}.b", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        pad = k // 2
        return self.op("Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, group=groups)

    def bn(self, x: str, name: str, channels: int) -> str:
        r = self.rng
        stats = [
            self.const(f"{name}.scale", r.uniform(0.5, 1.5, channels).astype(np.float32)),
            self.const(f"{name}.shift", r.normal(0, 0.1, channels).astype(np.float32)),
            self.const(f"{name}.mean", r.normal(0, 0.1, channels).astype(np.float32)),
            self.const(f"{name}.var", r.uniform(0.5, 1.5, channels).astype(np.float32)),
        ]
        return self.op("BatchNormalization", [x, *stats], name, epsilon=1e-5)

    def conv_bn(self, x, name, cin, cout, k=3, stride=1, groups=1, act="Relu") -> str:
        y = self.bn(self.conv(x, f"{name}.conv", cin, cout, k, stride, groups), f"{name}.bn", cout)
        if act == "Relu":
            return self.op("Relu", [y], f"{name}.relu")
        if act == "Relu6":
            lo, hi = self.const(f"{name}.lo", np.float32(0)), self.const(f"{name}.hi", np.float32(6))
            return self.op("Clip", [y, lo, hi], f"{name}.relu6")
        return y

    def gemm(self, x, name, cin, cout, trans_b=True) -> str:
        shape = (cout, cin) if trans_b else (cin, cout)
        w = self.const(f"{name}.w", self.rng.normal(0, (1 / cin) ** 0.5, shape).astype(np.float32))
        b = self.const(f"{name}.b", self.rng.normal(0, 0.1, cout).astype(np.float32))
        return self.op("Gemm", [x, w, b], name, transB=int(trans_b))

    def model(self, name: str, inputs: dict, outputs: list[str], opset: int = OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="quantvm-tests")
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # fills the output shapes
        onnx.checker.check_model(model, full_check=True)
        return model


def bottleneck(g: GraphBuilder, x: str, name: str, cin: int, mid: int, cout: int, stride: int = 1) -> str:
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (strided) -> 1x1, projection shortcut where shapes change."""
    y = g.conv_bn(x, f"{name}.a", cin, mid, k=1)
    y = g.conv_bn(y, f"{name}.b", mid, mid, k=3, stride=stride)
    y = g.conv_bn(y, f"{name}.c", mid, cout, k=1, act=None)
    shortcut = x if cin == cout and stride == 1 else g.conv_bn(x, f"{name}.proj", cin, cout, k=1, stride=stride, act=None)
    return g.op("Relu", [g.op("Add", [y, shortcut], f"{name}.add")], f"{name}.out")


def resnet_bottleneck_block(rng) -> onnx.ModelProto:
    g = GraphBuilder(rng)
    y = bottleneck(g, "data", "block1", 16, 8, 16)
    y = bottleneck(g, y, "block2", 16, 8, 32, stride=2)
    return g.model("bottleneck", {"data": (1, 16, 12, 12)}, [y])


def depthwise_separable_block(rng) -> onnx.ModelProto:
    """MobileNet-style: depthwise 3x3 (+ bias) + BN + ReLU6, then pointwise 1x1 + BN + ReLU, one strided."""
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "stem", 3, 16, stride=2, act="Relu6")
    y = g.conv_bn(y, "dw1", 16, 16, groups=16, act="Relu6")
    y = g.conv_bn(y, "pw1", 16, 24, k=1)
    y = g.conv_bn(y, "dw2", 24, 24, stride=2, groups=24, act="Relu6")
    y = g.conv_bn(y, "pw2", 24, 32, k=1)
    y = g.conv_bn(y, "grouped", 32, 32, groups=4)
    return g.model("depthwise_separable", {"data": (2, 3, 20, 20)}, [y])


def mlp(rng) -> onnx.ModelProto:
    """Gemm + ReLU, MatMul with a constant weight + Add + Sigmoid, Gemm (transB=0) + Softmax."""
    g = GraphBuilder(rng)
    y = g.op("Relu", [g.gemm("data", "fc1", 32, 64)], "fc1.relu")
    w = g.const("fc2.w", rng.normal(0, 0.125, (64, 48)).astype(np.float32))
    b = g.const("fc2.b", rng.normal(0, 0.1, 48).astype(np.float32))
    y = g.op("Sigmoid", [g.op("Add", [g.op("MatMul", [y, w], "fc2.matmul"), b], "fc2.add")], "fc2.sigmoid")
    y = g.op("Softmax", [g.gemm(y, "fc3", 48, 10, trans_b=False)], "probs", axis=-1)
    return g.model("mlp", {"data": (4, 32)}, [y])


def pooling_variants(rng) -> onnx.ModelProto:
    """Max and average pooling (padded, strided, ceil mode), global pooling, concatenated; two outputs."""
    g = GraphBuilder(rng)
    x = g.conv_bn("data", "stem", 4, 8)
    a = g.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    b = g.op("AveragePool", [x], "avgpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
             count_include_pad=0)
    c = g.op("AveragePool", [x], "avgpool_ceil", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
             count_include_pad=1)
    cat = g.op("Concat", [a, b, c], "concat", axis=1)
    gap = g.op("GlobalAveragePool", [cat], "gap")
    gmp = g.op("GlobalMaxPool", [cat], "gmp")
    return g.model("pooling", {"data": (1, 4, 15, 15)}, [gap, gmp])


def resnet50(rng, image: int = 224, batch: int = 1) -> onnx.ModelProto:
    """ResNet-50 v1.5 with random weights and unfolded BatchNorm, as a torchvision export looks (opset 17)."""
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "conv1", 3, 64, k=7, stride=2)
    y = g.op("MaxPool", [y], "pool1", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, mid) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)]):
        for i in range(blocks):
            stride = 2 if i == 0 and stage > 0 else 1
            y = bottleneck(g, y, f"layer{stage + 1}.{i}", cin, mid, mid * 4, stride)
            cin = mid * 4
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y], "gap")], "flatten")
    y = g.gemm(y, "fc", 2048, 1000)
    return g.model("resnet50", {"data": (batch, 3, image, image)}, [y])


def mobilenet_v2(rng, image: int = 224, batch: int = 1) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0) with random weights and unfolded BatchNorm: inverted residual blocks of
    1x1 expand, 3x3 depthwise and 1x1 project convs, ReLU6, residual Adds where shapes allow."""
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "stem", 3, 32, stride=2, act="Relu6")
    cin = 32
    for stage, (expand, cout, repeats, first_stride) in enumerate(
            [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1)]):
        for i in range(repeats):
            name, stride, mid = f"block{stage}.{i}", first_stride if i == 0 else 1, cin * expand
            x = y
            if expand != 1:
                y = g.conv_bn(y, f"{name}.expand", cin, mid, k=1, act="Relu6")
            y = g.conv_bn(y, f"{name}.dw", mid, mid, stride=stride, groups=mid, act="Relu6")
            y = g.conv_bn(y, f"{name}.project", mid, cout, k=1, act=None)
            if stride == 1 and cin == cout:
                y = g.op("Add", [y, x], f"{name}.add")
            cin = cout
    y = g.conv_bn(y, "head", cin, 1280, k=1, act="Relu6")
    y = g.op("Flatten", [g.op("GlobalAveragePool", [y], "gap")], "flatten")
    y = g.gemm(y, "classifier", 1280, 1000)
    return g.model("mobilenet_v2", {"data": (batch, 3, image, image)}, [y])


def _clip(g, x, name, lo, hi):
    return g.op("Clip", [x, g.const(f"{name}.lo", np.float32(lo)), g.const(f"{name}.hi", np.float32(hi))], name)


def _gelu_as_math(g, x, name, form):
    """GELU the way exporters before opset 20 write it out."""
    def c(suffix, value):
        return g.const(f"{name}.const.{suffix}", np.float32(value))

    if form == "erf":
        core = g.op("Erf", [g.op("Div", [x, c("sqrt2", 2 ** 0.5)], f"{name}.div")], f"{name}.erf")
    else:
        cube = g.op("Pow", [x, c("three", 3)], f"{name}.cube")
        inner = g.op("Add", [x, g.op("Mul", [cube, c("k", 0.044715)], f"{name}.k")], f"{name}.inner")
        core = g.op("Tanh", [g.op("Mul", [inner, c("s", (2 / np.pi) ** 0.5)], f"{name}.s")], f"{name}.tanh")
    one_plus = g.op("Add", [core, c("one", 1)], f"{name}.one_plus")
    return g.op("Mul", [g.op("Mul", [c("half", 0.5), x], f"{name}.half_x"), one_plus], name)


# fusion-rule activation name -> how an ONNX exporter writes it (opset 20 for Gelu)
ONNX_ACTIVATIONS = {
    "relu": lambda g, x, n: g.op("Relu", [x], n),
    "gelu": lambda g, x, n: g.op("Gelu", [x], n),
    "gelu_tanh": lambda g, x, n: g.op("Gelu", [x], n, approximate="tanh"),
    "gelu_erf_math": lambda g, x, n: _gelu_as_math(g, x, n, "erf"),
    "gelu_tanh_math": lambda g, x, n: _gelu_as_math(g, x, n, "tanh"),
    "leaky_relu": lambda g, x, n: g.op("LeakyRelu", [x], n, alpha=0.1),
    "sigmoid": lambda g, x, n: g.op("Sigmoid", [x], n),
    "softrelu": lambda g, x, n: g.op("Softplus", [x], n),
    "tanh": lambda g, x, n: g.op("Tanh", [x], n),
    "bounded_relu": lambda g, x, n: _clip(g, x, n, 0, 6),
    "hardswish": lambda g, x, n: g.op("HardSwish", [x], n),
    "hardswish_torch": lambda g, x, n: g.op("Mul", [x, g.op("HardSigmoid", [x], f"{n}.gate", alpha=1 / 6)], n),
    "hardsigmoid": lambda g, x, n: g.op("HardSigmoid", [x], n),
    "silu": lambda g, x, n: g.op("Mul", [x, g.op("Sigmoid", [x], f"{n}.sigmoid")], n),
    "square": lambda g, x, n: g.op("Mul", [x, x], n),
    "sqrt": lambda g, x, n: g.op("Sqrt", [x], n),
    "exp": lambda g, x, n: g.op("Exp", [x], n),
    "abs": lambda g, x, n: g.op("Abs", [x], n),
    "elu": lambda g, x, n: g.op("Elu", [x], n, alpha=0.7),
}


def conv_act(rng, act: str, depthwise: bool = False) -> onnx.ModelProto:
    """Conv + BN + one activation; depthwise when asked."""
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 8, groups=8 if depthwise else 1, act=None)
    return g.model(f"conv_{act}", {"data": (1, 8, 7, 7)}, [ONNX_ACTIVATIONS[act](g, y, "act")], opset=20)


def fc_act(rng, act: str) -> onnx.ModelProto:
    """Gemm + one elementwise op."""
    g = GraphBuilder(rng)
    y = g.gemm("data", "fc", 16, 12)
    return g.model(f"fc_{act}", {"data": (3, 16)}, [ONNX_ACTIVATIONS[act](g, y, "act")], opset=20)


def conv_sum(rng, order: str) -> onnx.ModelProto:
    """Conv + BN with a residual Add placed as `order` says: 'sum_act', 'act_sum' or 'sum'."""
    g = GraphBuilder(rng)
    y = g.conv_bn("data", "block", 8, 8, act=None)
    if order == "act_sum":
        y = g.op("Relu", [y], "act")
    y = g.op("Add", [y, "data"], "sum")
    if order == "sum_act":
        y = g.op("Relu", [y], "act")
    return g.model(f"conv_{order}", {"data": (1, 8, 7, 7)}, [y])


def fc_sum(rng) -> onnx.ModelProto:
    g = GraphBuilder(rng)
    w = g.const("fc.w", rng.normal(0, 0.25, (16, 16)).astype(np.float32))
    y = g.op("Add", [g.op("MatMul", ["data", w], "fc"), "data"], "sum")
    return g.model("fc_sum", {"data": (3, 16)}, [y])


def bn_relu(rng) -> onnx.ModelProto:
    """ResNet v2 pre-activation: BN + ReLU on a tensor no conv produced, then a conv."""
    g = GraphBuilder(rng)
    y = g.op("Relu", [g.bn("data", "preact.bn", 8)], "preact.relu")
    return g.model("bn_relu", {"data": (1, 8, 7, 7)}, [g.conv(y, "conv", 8, 8)])


MODELS = {
    "resnet_bottleneck": resnet_bottleneck_block,
    "depthwise_separable": depthwise_separable_block,
    "mlp": mlp,
    "pooling": pooling_variants,
}


def convnext_block(rng, channels: int = 32, size: int = 14, per_pixel: str = "LayerNormalization") -> onnx.ModelProto:
    """A ConvNeXt block as torch exports it: a depthwise 7x7 conv, a permute to NHWC, LayerNorm, Linear, GELU
    (written out), Linear, a permute back, the layer scale and the residual; then a LayerNorm2d written as
    two permutes around a LayerNorm and a stride-2 conv. `per_pixel` replaces the downsampling's LayerNorm
    (`Softmax` over the channels: an op the channels-first rewrite does not know; `Regrid`: a reshape to
    another pixel grid before it)."""
    g, c = GraphBuilder(rng), channels

    def layer_norm(x, name):
        return g.op("LayerNormalization", [x, g.const(f"{name}.g", rng.uniform(0.5, 1.5, c).astype(np.float32)),
                                           g.const(f"{name}.beta", rng.normal(0, 0.1, c).astype(np.float32))],
                    name, axis=-1, epsilon=1e-6)

    def linear(x, name, cin, cout):
        y = g.op("MatMul", [x, g.const(f"{name}.w", rng.normal(0, cin ** -0.5, (cin, cout)).astype(np.float32))], name)
        return g.op("Add", [y, g.const(f"{name}.bias", rng.normal(0, 0.1, cout).astype(np.float32))], f"{name}.add")

    y = g.op("Transpose", [g.conv("x", "dw", c, c, 7, groups=c, bias=True)], "to_nhwc", perm=[0, 2, 3, 1])
    y = linear(_gelu_as_math(g, linear(layer_norm(y, "ln"), "fc1", c, 4 * c), "gelu", "erf"), "fc2", 4 * c, c)
    y = g.op("Transpose", [y], "to_nchw", perm=[0, 3, 1, 2])
    y = g.op("Mul", [g.const("layer_scale", rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32)), y], "scaled")
    y = g.op("Add", [y, "x"], "residual")
    z = g.op("Transpose", [y], "down.to_nhwc", perm=[0, 2, 3, 1])
    if per_pixel == "Regrid":  # a reshape that re-tiles the pixels inside the island
        shape = g.const("regrid", np.array([1, size // 2, size * 2, c], np.int64))
        z = layer_norm(g.op("Reshape", [z, shape], "down.regrid"), "down.ln")
    elif per_pixel == "LayerNormalization":
        z = layer_norm(z, "down.ln")
    else:
        z = g.op(per_pixel, [z], "down.ln", axis=-1)
    z = g.op("Transpose", [z], "down.to_nchw", perm=[0, 3, 1, 2])
    z = g.conv(z, "down", c, 2 * c, 2, stride=2, bias=True)
    return g.model("convnext_block", {"x": (1, c, size, size)}, [z])


def random_inputs(model: onnx.ModelProto, rng) -> dict[str, np.ndarray]:
    """Normal random float32 data for every (static-shaped) graph input."""
    weights = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name not in weights:
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# fp32 results against onnxruntime: to this share of the output's range. Winograd F(4x4, 3x3) convs
# (targets.winograd) round about 3x as much as direct ones: a few 1e-6 of the range a layer.
FP32_RANGE_TOLERANCE = 2e-5


def assert_matches_fp32(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=FP32_RANGE_TOLERANCE * float(np.abs(want).max()))


def onnxruntime_outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def token_embedding(rng, vocab: int = 10, types: int = 2, width: int = 16, tokens: int = 3) -> onnx.ModelProto:
    """Token ids [1, tokens] (int64) into a vocab-row table, plus int32 type ids, unsqueezed then cast, into a
    types-row table, added, masked and through an FC: what a text encoder's inputs go through first. The mask
    is read as data, not as indices."""
    g = GraphBuilder(rng)
    words = g.const("words", rng.standard_normal((vocab, width)).astype(np.float32))
    kinds = g.const("kinds", rng.standard_normal((types, width)).astype(np.float32))
    embedded = g.op("Gather", [words, "ids"], "word_gather")
    type_ids = g.op("Cast", [g.op("Unsqueeze", ["type_ids", g.const("axis0", np.array([0]))], "type_unsqueeze")],
                    "type_cast", to=TensorProto.INT64)
    typed = g.op("Add", [embedded, g.op("Gather", [kinds, type_ids], "type_gather")], "sum")
    mask = g.op("Cast", [g.op("Unsqueeze", ["mask", g.const("axis2", np.array([2]))], "mask_unsqueeze")], "mask_cast",
                to=TensorProto.FLOAT)
    out = g.op("MatMul", [g.op("Mul", [typed, mask], "masked"),
                          g.const("head.w", rng.standard_normal((width, width)).astype(np.float32))], "head")
    graph = helper.make_graph(
        g.nodes, "token_embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, tokens]),
         helper.make_tensor_value_info("type_ids", TensorProto.INT32, [tokens]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, [1, tokens])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="quantvm-tests")
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model
