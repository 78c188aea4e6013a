"""Small, fast-to-compile versions of the corpus architectures most likely to break, built with onnx.helper
and random weights (no torch): the CI subset of `examples/corpus.py`.

Each builder takes a numpy Generator and returns an onnx.ModelProto with the op patterns its real
counterpart's exporter writes (see examples/corpus_export.py for the full-size torch versions).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.fixtures import ONNX_ACTIVATIONS, GraphBuilder

OPSET = 17
VOCAB = 64  # token ids of the encoder are drawn below this


def typed_model(g: GraphBuilder, name: str, inputs: dict, outputs: list[str], opset: int = OPSET) -> onnx.ModelProto:
    """Like GraphBuilder.model, for inputs given as name -> (shape, TensorProto element type)."""
    graph = helper.make_graph(g.nodes, name,
                              [helper.make_tensor_value_info(n, t, list(s)) for n, (s, t) in inputs.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="quantvm-tests")
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def weight(g: GraphBuilder, name: str, shape, scale: float | None = None) -> str:
    scale = scale if scale is not None else (1 / shape[0]) ** 0.5
    return g.const(name, g.rng.normal(0, scale, shape).astype(np.float32))


def ints(g: GraphBuilder, name: str, values) -> str:
    return g.const(name, np.asarray(values, dtype=np.int64))


def silu(g, x, name):
    return ONNX_ACTIVATIONS["silu"](g, x, name)


def hardswish_math(g: GraphBuilder, x: str, name: str) -> str:
    """x * clip(x + 3, 0, 6) / 6, as PaddlePaddle-style exporters write HardSwish."""
    shifted = g.op("Add", [x, g.const(f"{name}.three", np.float32(3))], f"{name}.add")
    clipped = g.op("Clip", [shifted, g.const(f"{name}.lo", np.float32(0)), g.const(f"{name}.hi", np.float32(6))],
                   f"{name}.clip")
    return g.op("Div", [g.op("Mul", [x, clipped], f"{name}.mul"), g.const(f"{name}.six", np.float32(6))], name)


def layer_norm_math(g: GraphBuilder, x: str, name: str, dim: int) -> str:
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, then scale and shift."""
    mean = g.op("ReduceMean", [x], f"{name}.mean", axes=[-1])
    centred = g.op("Sub", [x, mean], f"{name}.sub")
    var = g.op("ReduceMean", [g.op("Pow", [centred, g.const(f"{name}.two", np.float32(2))], f"{name}.pow")],
               f"{name}.var", axes=[-1])
    std = g.op("Sqrt", [g.op("Add", [var, g.const(f"{name}.eps", np.float32(1e-5))], f"{name}.add_eps")],
               f"{name}.sqrt")
    normed = g.op("Div", [centred, std], f"{name}.div")
    scaled = g.op("Mul", [normed, g.const(f"{name}.gamma", g.rng.uniform(0.5, 1.5, dim).astype(np.float32))],
                  f"{name}.scale")
    return g.op("Add", [scaled, g.const(f"{name}.beta", g.rng.normal(0, 0.1, dim).astype(np.float32))], name)


def squeeze_excite(g: GraphBuilder, x: str, name: str, c: int) -> str:
    """GlobalAveragePool -> 1x1 conv -> ReLU -> 1x1 conv -> HardSigmoid -> channel multiply."""
    s = g.op("GlobalAveragePool", [x], f"{name}.pool")
    s = g.op("Relu", [g.conv(s, f"{name}.fc1", c, c // 4, k=1, bias=True)], f"{name}.relu")
    gate = g.op("HardSigmoid", [g.conv(s, f"{name}.fc2", c // 4, c, k=1, bias=True)], f"{name}.gate",
                alpha=1 / 6, beta=0.5)
    return g.op("Mul", [x, gate], f"{name}.mul")


def resize(g: GraphBuilder, x: str, name: str, factor: float = 2.0) -> str:
    scales = g.const(f"{name}.scales", np.array([1, 1, factor, factor], np.float32))
    return g.op("Resize", [x, "", scales], name, mode="nearest")


def db_text_detector(rng) -> onnx.ModelProto:
    """DB-style: MobileNetV3-like stages with HardSigmoid SE, FPN with nearest Resize and Add, Concat, a
    standalone BatchNormalization, then a head of Conv and two ConvTranspose upsamplings."""
    g = GraphBuilder(rng)
    y = g.op("HardSwish", [g.conv_bn("images", "stem", 3, 8, stride=2, act=None)], "stem.hswish")
    feats, cin = [], 8
    for i, cout in enumerate((8, 16)):
        y = g.conv_bn(y, f"stage{i}.dw", cin, cin, stride=2, groups=cin)
        y = g.conv_bn(squeeze_excite(g, y, f"stage{i}.se", cin), f"stage{i}.pw", cin, cout, k=1, act=None)
        feats.append(y)
        cin = cout
    fine, coarse = g.conv(feats[0], "fpn.lateral0", 8, 8, k=1), g.conv(feats[1], "fpn.lateral1", 16, 8, k=1)
    fine = g.op("Add", [fine, resize(g, coarse, "fpn.up")], "fpn.add")
    fused = g.bn(g.op("Concat", [fine, resize(g, coarse, "fpn.out_up")], "fpn.concat", axis=1), "head.pre_bn", 16)
    w1 = weight(g, "head.up1.w", (16, 8, 2, 2), 0.3)
    y = g.op("Relu", [g.bn(g.op("ConvTranspose", [fused, w1], "head.up1", strides=[2, 2]), "head.up1.bn", 8)],
             "head.up1.relu")
    w2 = weight(g, "head.up2.w", (8, 1, 2, 2), 0.3)
    b2 = g.const("head.up2.b", np.array([0.1], np.float32))
    y = g.op("Sigmoid", [g.op("ConvTranspose", [y, w2, b2], "head.up2", strides=[2, 2])], "probability")
    return g.model("db_text_detector", {"images": (1, 3, 32, 32)}, [y])


def silu_conv(g: GraphBuilder, x: str, name: str, cin: int, cout: int, k: int = 3, stride: int = 1) -> str:
    return silu(g, g.conv_bn(x, name, cin, cout, k=k, stride=stride, act=None), f"{name}.silu")


def yolov8_style(rng) -> onnx.ModelProto:
    """Conv-BN-SiLU (x*sigmoid(x)); C2f's Split and Concat; SPPF's chain of three MaxPools; nearest Resize;
    a detect head whose box and class maps are concatenated and flattened."""
    g = GraphBuilder(rng)
    stem = silu_conv(g, "images", "stem", 3, 8, stride=2)
    g.nodes.append(helper.make_node("Split", [stem, ints(g, "c2f.split_sizes", [4, 4])], ["c2f.a", "c2f.b"],
                                    name="c2f.split", axis=1))
    m = g.op("Add", ["c2f.b", silu_conv(g, "c2f.b", "c2f.m", 4, 4)], "c2f.m.add")
    p3 = silu_conv(g, g.op("Concat", ["c2f.a", "c2f.b", m], "c2f.concat", axis=1), "c2f.cv2", 12, 8, k=1)
    pools = [silu_conv(g, p3, "down", 8, 8, stride=2)]
    for i in range(3):
        pools.append(g.op("MaxPool", [pools[-1]], f"sppf.pool{i}", kernel_shape=[5, 5], pads=[2, 2, 2, 2]))
    p4 = silu_conv(g, g.op("Concat", pools, "sppf.concat", axis=1), "sppf.cv2", 32, 8, k=1)
    n3 = g.op("Concat", [resize(g, p4, "up"), p3], "neck.concat", axis=1)
    box = g.conv(n3, "head.box", 16, 8, k=1, bias=True)
    cls = g.op("Sigmoid", [g.conv(n3, "head.cls", 16, 4, k=1, bias=True)], "head.cls.sigmoid")
    cat = g.op("Concat", [box, cls], "head.concat", axis=1)
    y = g.op("Reshape", [cat, ints(g, "head.shape", [1, 12, -1])], "detections")
    return g.model("yolov8_style", {"images": (1, 3, 32, 32)}, [y])


def vad_streaming(rng, hidden: int = 128) -> onnx.ModelProto:
    """Silero-VAD-like: audio [1, 576] and state [2, 1, 128] (h, c) in; Conv1d front end, then one LSTM step
    unrolled into Gemm/Split/Sigmoid/Tanh; speech probability and the next state out."""
    g = GraphBuilder(rng)
    x = g.op("Unsqueeze", ["audio", ints(g, "audio.axis", [1])], "audio.unsqueeze")
    for i, (cin, cout, k, stride) in enumerate(((1, 32, 64, 32), (32, 48, 3, 2), (48, 64, 3, 2))):
        w = weight(g, f"conv{i}.w", (cout, cin, k), (2 / (cin * k)) ** 0.5)
        b = g.const(f"conv{i}.b", rng.normal(0, 0.1, cout).astype(np.float32))
        x = g.op("Relu", [g.op("Conv", [x, w, b], f"conv{i}", kernel_shape=[k], strides=[stride],
                                pads=[k // 2, k // 2])], f"conv{i}.relu")
    feat = g.op("ReduceMean", [x], "pool", axes=[2], keepdims=0)  # [1, 64]
    h = g.op("Gather", ["state", ints(g, "h.index", 0)], "h", axis=0)
    c = g.op("Gather", ["state", ints(g, "c.index", 1)], "c", axis=0)
    gates = g.op("Add", [g.gemm(feat, "lstm.input", 64, 4 * hidden), g.gemm(h, "lstm.hidden", hidden, 4 * hidden)],
                 "lstm.gates")
    g.nodes.append(helper.make_node("Split", [gates, ints(g, "lstm.split_sizes", [hidden] * 4)],
                                    ["lstm.i", "lstm.f", "lstm.g", "lstm.o"], name="lstm.split", axis=1))
    i, f, o = (g.op("Sigmoid", [f"lstm.{n}"], f"lstm.{n}.sigmoid") for n in "ifo")
    c_next = g.op("Add", [g.op("Mul", [f, c], "lstm.fc"),
                          g.op("Mul", [i, g.op("Tanh", ["lstm.g"], "lstm.g.tanh")], "lstm.ig")], "c_next")
    h_next = g.op("Mul", [o, g.op("Tanh", [c_next], "c_next.tanh")], "h_next")
    prob = g.op("Sigmoid", [g.gemm(g.op("Relu", [h_next], "h.relu"), "decoder", hidden, 1)], "probability")
    axis0 = ints(g, "state.axis", [0])
    state = g.op("Concat", [g.op("Unsqueeze", [h_next, axis0], "h.unsqueeze"),
                            g.op("Unsqueeze", [c_next, axis0], "c.unsqueeze")], "next_state", axis=0)
    return g.model("vad_streaming", {"audio": (1, 576), "state": (2, 1, hidden)}, [prob, state])


def svtr_recognizer(rng, dim: int = 32, heads: int = 4) -> onnx.ModelProto:
    """Conv stem with decomposed HardSwish, one attention block with decomposed LayerNorm (MatMul, Softmax,
    Transpose, Reshape), an MLP with decomposed HardSwish, per-step class probabilities."""
    g = GraphBuilder(rng)
    y = hardswish_math(g, g.conv_bn("images", "stem1", 3, dim // 2, stride=2, act=None), "stem1.hswish")
    y = hardswish_math(g, g.conv_bn(y, "stem2", dim // 2, dim, stride=2, act=None), "stem2.hswish")  # [1, 32, 4, 16]
    steps, head_dim = 4 * 16, dim // heads
    x = g.op("Transpose", [g.op("Reshape", [y, ints(g, "flat.shape", [1, dim, steps])], "flat")], "tokens",
             perm=[0, 2, 1])
    qkv = g.op("MatMul", [layer_norm_math(g, x, "norm1", dim), weight(g, "qkv.w", (dim, 3 * dim))], "qkv")
    qkv = g.op("Transpose", [g.op("Reshape", [qkv, ints(g, "qkv.shape", [1, steps, 3, heads, head_dim])],
                                  "qkv.reshape")], "qkv.heads", perm=[2, 0, 3, 1, 4])
    q, k, v = (g.op("Gather", [qkv, ints(g, f"{n}.index", i)], n, axis=0) for i, n in enumerate("qkv"))
    scores = g.op("MatMul", [q, g.op("Transpose", [k], "k.t", perm=[0, 1, 3, 2])], "scores")
    attn = g.op("Softmax", [g.op("Mul", [scores, g.const("scale", np.float32(head_dim ** -0.5))], "scaled")],
                "attn", axis=-1)
    ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [attn, v], "context")], "context.t", perm=[0, 2, 1, 3]),
                           ints(g, "context.shape", [1, steps, dim])], "context.merge")
    x = g.op("Add", [x, g.op("MatMul", [ctx, weight(g, "proj.w", (dim, dim))], "proj")], "residual1")
    hidden = g.op("MatMul", [layer_norm_math(g, x, "norm2", dim), weight(g, "fc1.w", (dim, 2 * dim))], "fc1")
    hidden = hardswish_math(g, g.op("Add", [hidden, g.const("fc1.b", rng.normal(0, 0.1, 2 * dim).astype(np.float32))],
                                    "fc1.add"), "fc1.hswish")
    x = g.op("Add", [x, g.op("MatMul", [hidden, weight(g, "fc2.w", (2 * dim, dim))], "fc2")], "residual2")
    logits = g.op("MatMul", [x, weight(g, "classes.w", (dim, 20))], "logits")
    return g.model("svtr_recognizer", {"images": (1, 3, 16, 64)}, [g.op("Softmax", [logits], "probs", axis=-1)])


def transformer_encoder(rng, seq: int = 16, dim: int = 32, heads: int = 4) -> onnx.ModelProto:
    """BERT-like: token ids [1, seq] and an attention mask, Gather embeddings + positions, LayerNormalization,
    multi-head attention with the additive mask, GELU (erf written out) MLP, LayerNormalization."""
    g = GraphBuilder(rng)
    head_dim = dim // heads

    def layer_norm(x, name):
        return g.op("LayerNormalization", [x, g.const(f"{name}.gamma", rng.uniform(0.5, 1.5, dim).astype(np.float32)),
                                           g.const(f"{name}.beta", rng.normal(0, 0.1, dim).astype(np.float32))],
                    name, axis=-1, epsilon=1e-12)

    def linear(x, name, cin, cout):
        w = g.op("MatMul", [x, weight(g, f"{name}.w", (cin, cout))], f"{name}.matmul")
        return g.op("Add", [w, g.const(f"{name}.b", rng.normal(0, 0.1, cout).astype(np.float32))], name)

    def split_heads(x, name):
        y = g.op("Reshape", [x, ints(g, f"{name}.shape", [1, seq, heads, head_dim])], f"{name}.reshape")
        return g.op("Transpose", [y], f"{name}.heads", perm=[0, 2, 1, 3])

    embedded = g.op("Gather", [weight(g, "embeddings.word", (VOCAB, dim), 0.5), "input_ids"], "embeddings.lookup")
    x = layer_norm(g.op("Add", [embedded, weight(g, "embeddings.position", (1, seq, dim), 0.5)], "embeddings.add"),
                   "embeddings.norm")
    mask = g.op("Cast", ["attention_mask"], "mask.float", to=TensorProto.FLOAT)
    mask = g.op("Mul", [g.op("Sub", [g.const("one", np.float32(1)), mask], "mask.invert"),
                        g.const("mask.big", np.float32(-1e4))], "mask.additive")
    mask = g.op("Reshape", [mask, ints(g, "mask.shape", [1, 1, 1, seq])], "mask.heads")
    q, k, v = (split_heads(linear(x, f"attn.{n}", dim, dim), f"attn.{n}") for n in "qkv")
    scores = g.op("MatMul", [q, g.op("Transpose", [k], "attn.k.t", perm=[0, 1, 3, 2])], "attn.scores")
    scores = g.op("Add", [g.op("Div", [scores, g.const("attn.sqrt_d", np.float32(head_dim ** 0.5))], "attn.scaled"),
                          mask], "attn.masked")
    ctx = g.op("MatMul", [g.op("Softmax", [scores], "attn.probs", axis=-1), v], "attn.context")
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], "attn.context.t", perm=[0, 2, 1, 3]),
                           ints(g, "attn.merge.shape", [1, seq, dim])], "attn.merge")
    x = layer_norm(g.op("Add", [x, linear(ctx, "attn.out", dim, dim)], "attn.residual"), "attn.norm")
    hidden = ONNX_ACTIVATIONS["gelu_erf_math"](g, linear(x, "ffn.in", dim, 4 * dim), "ffn.gelu")
    x = layer_norm(g.op("Add", [x, linear(hidden, "ffn.out", 4 * dim, dim)], "ffn.residual"), "ffn.norm")
    return typed_model(g, "transformer_encoder", {"input_ids": ((1, seq), TensorProto.INT64),
                                                  "attention_mask": ((1, seq), TensorProto.INT64)}, [x])


def recurrent_ops(rng, seq: int = 8, features: int = 16, hidden: int = 24) -> onnx.ModelProto:
    """The ONNX LSTM and GRU ops (as torch's nn.LSTM/nn.GRU export them): sequence-first input [seq, 1, F]
    and initial states [1, 1, H] as inputs; the GRU runs on the LSTM's output sequence."""
    g = GraphBuilder(rng)
    scale = hidden ** -0.5

    def rnn(op, x, cin, gates, name, states):
        w = weight(g, f"{name}.W", (1, gates * hidden, cin), scale)
        r = weight(g, f"{name}.R", (1, gates * hidden, hidden), scale)
        b = g.const(f"{name}.B", rng.normal(0, 0.1, (1, 2 * gates * hidden)).astype(np.float32))
        outs = [f"{name}.Y", f"{name}.Y_h"] + ([f"{name}.Y_c"] if op == "LSTM" else [])
        extra = {"linear_before_reset": 1} if op == "GRU" else {}
        g.nodes.append(helper.make_node(op, [x, w, r, b, "", *states], outs, name=name, hidden_size=hidden, **extra))
        return outs

    y, h, c = rnn("LSTM", "sequence", features, 4, "lstm", ["lstm_h0", "lstm_c0"])
    y = g.op("Squeeze", [y, ints(g, "lstm.Y.axis", [1])], "lstm.Y.squeeze")  # [seq, 1, H]
    gru_y, gru_h = rnn("GRU", y, hidden, 3, "gru", ["gru_h0"])
    return g.model("recurrent_ops", {"sequence": (seq, 1, features), "lstm_h0": (1, 1, hidden),
                                     "lstm_c0": (1, 1, hidden), "gru_h0": (1, 1, hidden)},
                   [gru_y, gru_h, h, c])


MODELS = {
    "db_text_detector": db_text_detector,
    "yolov8_style": yolov8_style,
    "vad_streaming": vad_streaming,
    "svtr_recognizer": svtr_recognizer,
    "transformer_encoder": transformer_encoder,
    "recurrent_ops": recurrent_ops,
}


def random_feeds(model: onnx.ModelProto, rng) -> dict[str, np.ndarray]:
    """Random data for every graph input: normal floats, token ids below VOCAB, masks of ones with the last
    quarter zero (padding)."""
    feeds = {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        shape = [d.dim_value for d in tensor.shape.dim]
        if tensor.elem_type == TensorProto.FLOAT:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
        elif "mask" in value.name:
            mask = np.ones(shape, np.int64)
            mask[..., -max(1, shape[-1] // 4):] = 0
            feeds[value.name] = mask
        else:
            feeds[value.name] = rng.integers(0, VOCAB, shape).astype(np.int64)
    return feeds
