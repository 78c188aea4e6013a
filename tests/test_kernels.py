"""Every scheduled kernel family against numpy, on each target this host can run, and the AVX-512 ones
compiled and read as assembly.

The kernels are built the way a model's are: the blocked compute from targets.conv2d, an epilogue, and
targets.schedules choosing the schedule from the shape and the target.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import te, tirx, topi

from targets import resolve_target
from targets.conv2d import conv2d_nchwc
from targets.dense import matmul_whole_rows
from targets.intrinsics import PAIR_BOUND, pairs_are_bounded
from targets.layout import vector_lanes
from targets.schedules import ScheduleLog, schedule_module
from targets.register_tiles import conv_tile, matmul_tile, whole_tiles_tile
from targets.rounding import round_half_even
from tests.host_targets import HOST_TARGETS


# (batch, in channels, size, out channels, kernel, stride, pad): 1x1, 3x3, strided, a 7x7 stem, odd sizes
CONV_SHAPES = [
    (1, 16, 14, 32, 1, 1, 0),
    (2, 32, 9, 16, 3, 1, 1),
    (1, 16, 15, 32, 3, 2, 1),
    (1, 16, 17, 16, 7, 2, 3),
    (3, 32, 7, 64, 1, 1, 0),
    # a tile's weights beyond targets.schedules.WEIGHT_PANEL_BYTES, fp32 and int8: chunks of input channels
    (1, 4096, 6, 32, 3, 1, 1),
    # rows of 17 and 71 (prime): a ragged register tile, its last one cut short
    (1, 48, 17, 48, 1, 1, 0),
    (1, 16, 73, 32, 3, 1, 0),
    # a deep reduction (576 inputs an output) on a row of 32: on 16 lanes, 3 x 4 whole tiles over 33 columns
    (1, 64, 32, 64, 3, 1, 1),
]


def _block(x: np.ndarray, lanes: int) -> np.ndarray:
    """NCHW -> NCHW{lanes}c."""
    n, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(n, c // lanes, lanes, h, w).transpose(0, 1, 3, 4, 2))


def _unblock(x: np.ndarray) -> np.ndarray:
    n, chunks, h, w, lanes = x.shape
    return x.transpose(0, 1, 4, 2, 3).reshape(n, chunks * lanes, h, w)


def _pack_weight(weight: np.ndarray, lanes: int, int8: bool) -> np.ndarray:
    o, i, kh, kw = weight.shape
    if int8:  # [O/b, I/4, KH, KW, b(o), 4(i)]
        return np.ascontiguousarray(weight.reshape(o // lanes, lanes, i // 4, 4, kh, kw).transpose(0, 2, 4, 5, 1, 3))
    return np.ascontiguousarray(weight.reshape(o // lanes, lanes, i // lanes, lanes, kh, kw)
                                .transpose(0, 2, 4, 5, 3, 1))


def _reference_conv(x, weight, stride, pad, groups=1, acc=np.float64):
    """Direct NCHW convolution in wide arithmetic."""
    x = np.pad(x.astype(acc), [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    n, c, h, w = x.shape
    o, i, kh, kw = weight.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), acc)
    per_group = o // groups
    for y in range(kh):
        for z in range(kw):
            window = x[:, :, y:y + stride * oh:stride, z:z + stride * ow:stride]
            for g in range(groups):
                out[:, g * per_group:(g + 1) * per_group] += np.einsum(
                    "nchw,oc->nohw", window[:, g * i:(g + 1) * i], weight[g * per_group:(g + 1) * per_group, :, y, z]
                    .astype(acc))
    return out


def schedule_func(func, spec) -> tuple[tvm.IRModule, str]:
    """Schedule `func` as a model's kernel would be; return the module and the rule used."""
    log = ScheduleLog()
    mod = schedule_module(tvm.IRModule({"main": func}), spec, log)
    assert not log.failed, log.failed
    return mod, log.applied["main"]


def build_func(func, spec):
    """Schedule and build `func`; return the library and the rule used."""
    mod, rule = schedule_func(func, spec)
    return tvm.compile(mod, target=spec.tvm_target()), rule


def _build(tensors, spec):
    return build_func(te.create_prim_func(tensors), spec)


def run_lib(lib, arrays, out_shape, out_dtype):
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
    return out.numpy()


def _conv_with_bias_relu(shape, lanes, data_dtype, tile_lanes=None, bounded_pairs=False):
    n, c, size, o, k, stride, pad = shape
    int8 = data_dtype != "float32"
    data = te.placeholder((n, c // lanes, size, size, lanes), data_dtype, name="data")
    wshape = (o // lanes, c // 4, k, k, lanes, 4) if int8 else (o // lanes, c // lanes, k, k, lanes, lanes)
    weight = te.placeholder(wshape, "int8" if int8 else "float32", name="weight")
    acc_dtype = "int32" if int8 else "float32"
    conv = conv2d_nchwc(data, weight, [stride, stride], [pad] * 4, [1, 1], 1, acc_dtype, tile_lanes, bounded_pairs)
    bias = te.placeholder((1, o // lanes, 1, 1, lanes), acc_dtype, name="bias")
    out = te.compute(conv.shape, lambda b, q, y, x, l: te.max(conv[b, q, y, x, l] + bias[0, q, 0, 0, l],
                                                              tirx.const(0, acc_dtype)), name="epilogue")
    return [data, weight, bias, out]


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_conv_matches_numpy(target, shape):
    spec = resolve_target(target)
    lanes = 8 if not spec.has("avx512f") else 16
    if shape[1] % lanes or shape[3] % lanes:
        pytest.skip(f"{shape} has channels that are not a multiple of this target's {lanes}-wide block")
    rng = np.random.default_rng(1)
    n, c, size, o, k, stride, pad = shape
    x = rng.standard_normal((n, c, size, size)).astype("float32")
    # scaled as trained nets are (outputs near 1), so that 1e-4 measures the kernel, not fp32 summation
    weight = (rng.standard_normal((o, c, k, k)) * (c * k * k) ** -0.5).astype("float32")
    bias = rng.standard_normal(o).astype("float32")
    lib, rule = _build(_conv_with_bias_relu(shape, lanes, "float32"), spec)
    assert rule == "conv2d_nchwc"
    expected = np.maximum(_reference_conv(x, weight, stride, pad) + bias[None, :, None, None], 0)
    out_shape = (n, o // lanes, expected.shape[2], expected.shape[3], lanes)
    got = run_lib(lib, [_block(x, lanes), _pack_weight(weight, lanes, False), _block(bias.reshape(1, o, 1, 1), lanes)],
               out_shape, "float32")
    np.testing.assert_allclose(_unblock(got), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_fp32_conv_pads_each_rows_inputs_in_its_loop(target):
    """A padded fp32 conv pads the input rows each output row reads inside that row's parallel iteration: no
    pass of its own over the whole input (a padded copy of a batch went to memory and back), one parallel loop;
    the numbers still match numpy."""
    spec = resolve_target(target)
    lanes = vector_lanes(spec)
    shape = (8, 2 * lanes, 56, 2 * lanes, 3, 2, 1)
    n, c, size, o, k, stride, pad = shape
    mod, rule = schedule_func(te.create_prim_func(_conv_with_bias_relu(shape, lanes, "float32")), spec)
    assert rule == "conv2d_nchwc"
    assert len(re.findall(r"T\.parallel\(", mod.script())) == 1
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, c, size, size)).astype("float32")
    weight = (rng.standard_normal((o, c, k, k)) * (c * k * k) ** -0.5).astype("float32")
    bias = rng.standard_normal(o).astype("float32")
    expected = np.maximum(_reference_conv(x, weight, stride, pad) + bias[None, :, None, None], 0)
    lib = tvm.compile(mod, target=spec.tvm_target())
    got = run_lib(lib, [_block(x, lanes), _pack_weight(weight, lanes, False), _block(bias.reshape(1, o, 1, 1), lanes)],
                  (n, o // lanes, expected.shape[2], expected.shape[3], lanes), "float32")
    np.testing.assert_allclose(_unblock(got), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width,chunks,lanes,tile", [
    (56, 16, 16, (7, 2, False)),  # whole tiles where a divisor gives enough FMAs per load
    (14, 16, 16, (7, 2, False)),
    (17, 12, 16, (3, 4, True)),  # exact, 17 x 1 would load a broadcast per FMA
    (71, 12, 16, (3, 4, True)),  # exact, 1 x 4 would have four accumulators; 16 lanes: at most 15 of them
    (13, 16, 8, (5, 2, True)),  # AVX2: 10 accumulators over 15 columns, not 13 x 1
])
def test_conv_register_tile_is_ragged_only_where_no_divisor_serves(width, chunks, lanes, tile):
    assert conv_tile(width, chunks, lanes, allow_ragged=True) == tile
    w, c, ragged = conv_tile(width, chunks, lanes, allow_ragged=False)
    assert width % w == 0 and not ragged


@pytest.mark.parametrize("width,chunks,lanes,tile", [
    (112, 12, 8, (2, 4, False)),  # MobileNetV2's 16->96: exact 2 x 4 (1.33) over ragged 3 x 3 (1.45)
    (14, 12, 8, (2, 4, False)),
    (7, 64, 8, (2, 4, True)),  # exact 7 x 1 scores 0.88 against 1.17: whole tiles, cut
    (13, 125, 8, (7, 1, True)),  # SqueezeNet's classifier: 1000 channels, one block a tile
    (17, 12, 16, (3, 4, True)),  # 12 accumulators: a tile stays under 16 vectors of 16 (STACK_ALLOCA_BYTES)
])
def test_int8_conv_computes_whole_tiles_only_where_no_exact_tile_comes_close(width, chunks, lanes, tile):
    """An int8 conv's ragged row costs guarded stores the score does not count (RAGGED_MARGIN)."""
    assert whole_tiles_tile(width, chunks, lanes) == tile
    assert conv_tile(width, chunks, lanes, allow_ragged=True)[2]  # each of these rows has a ragged best


@pytest.mark.parametrize("width,chunks,depth,tile", [
    (32, 32, 4608, (3, 4, True)),   # FCN-ResNet50's 3x3 on 512 channels: 12 accumulators over 33 columns
    (32, 32, 64, (2, 4, False)),    # shallow: the stores count, RAGGED_MARGIN holds
    (14, 3, 4608, (2, 3, False)),   # 5 x 3 would compute 15 columns of 14: over RAGGED_WASTE
    (160, 2, 864, (7, 2, True)),    # a text detector's 160-wide map: 161 columns
])
def test_a_deep_int8_conv_takes_the_ragged_tile_with_more_accumulators(width, chunks, depth, tile):
    """With hundreds of reduction steps a tile, the accumulators' latency bounds the conv, not its guarded
    stores (DEEP_TILE_REDUCTION)."""
    assert whole_tiles_tile(width, chunks, 16, depth) == tile


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv_matches_numpy(target, stride):
    spec = resolve_target(target)
    lanes, channels, size = 8, 24, 13
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, channels, size, size)).astype("float32")
    weight = rng.standard_normal((channels, 1, 3, 3)).astype("float32")
    data = te.placeholder((2, channels // lanes, size, size, lanes), "float32", name="data")
    packed = te.placeholder((channels // lanes, 1, 3, 3, 1, lanes), "float32", name="weight")
    conv = conv2d_nchwc(data, packed, [stride, stride], [1] * 4, [1, 1], channels, "float32")
    out = te.compute(conv.shape, lambda *i: te.min(te.max(conv(*i), tirx.const(0.0)), tirx.const(6.0)), name="relu6")
    lib, rule = _build([data, packed, out], spec)
    assert rule == "depthwise_conv2d_nchwc"
    expected = np.clip(_reference_conv(x, weight, stride, 1, groups=channels), 0, 6)
    blocked_weight = np.ascontiguousarray(weight.reshape(channels // lanes, lanes, 1, 3, 3).transpose(0, 2, 3, 4, 1)
                                          [:, :, :, :, None, :])
    got = run_lib(lib, [_block(x, lanes), blocked_weight], (2, channels // lanes) + expected.shape[2:] + (lanes,),
               "float32")
    np.testing.assert_allclose(_unblock(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("data_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("kernel", [3, 7])
def test_int8_depthwise_conv_is_exact_at_the_extremes(target, data_dtype, kernel):
    """An int8 depthwise conv's sums are exact: data at its range's ends and weights of -128 and 127 make the
    largest sums a 7x7 window can reach (LLVM forms them with 16-bit multiply-adds, vpmaddwd / vpdpwssd)."""
    spec = resolve_target(target)
    lanes, channels, size = 8, 16, 9
    rng = np.random.default_rng(6)
    info = np.iinfo(data_dtype)
    x = rng.choice([info.min, info.max], (1, channels, size, size)).astype(data_dtype)
    weight = rng.choice([-128, 127], (channels, 1, kernel, kernel)).astype("int8")
    weight[0] = -128  # one channel of whole-window extremes: |sum| = 49 * 255 * 128 on the max data
    x[0, 0] = info.max
    data = te.placeholder((1, channels // lanes, size, size, lanes), data_dtype, name="data")
    packed = te.placeholder((channels // lanes, 1, kernel, kernel, 1, lanes), "int8", name="weight")
    pad = kernel // 2
    out = conv2d_nchwc(data, packed, [1, 1], [pad] * 4, [1, 1], channels, "int32")
    lib, rule = _build([data, packed, out], spec)
    assert rule == "depthwise_conv2d_nchwc"
    expected = _reference_conv(x.astype(np.int64), weight.astype(np.int64), 1, pad, groups=channels, acc=np.int64)
    blocked_weight = np.ascontiguousarray(weight.reshape(channels // lanes, lanes, 1, kernel, kernel)
                                          .transpose(0, 2, 3, 4, 1)[:, :, :, :, None, :])
    got = run_lib(lib, [_block(x, lanes), blocked_weight], (1, channels // lanes, size, size, lanes), "int32")
    np.testing.assert_array_equal(_unblock(got), expected)


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_blocked_pooling_takes_the_window_rule(target, kind):
    """A lone pooling in NCHW{c} (Inception's 3x3/1 average, a 3x3/2 max on a row of 73): registers over
    the window, the lanes vectorized."""
    spec = resolve_target(target)
    rng = np.random.default_rng(7)
    size, stride = (73, 2) if kind == "max" else (35, 1)
    x = rng.standard_normal((1, 16, size, size)).astype("float32")
    data = te.placeholder((1, 2, size, size, 8), "float32", name="data")
    pooled = topi.nn.pool2d(data, [3, 3], [stride, stride], [1, 1], [1, 1, 1, 1], kind, layout="NCHW8c",
                            count_include_pad=False)
    lib, rule = _build([data, pooled], spec)
    assert rule == "pool_nchwc"
    fill = -np.inf if kind == "max" else np.nan
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)], constant_values=fill)
    windows = [padded[:, :, i:i + size:stride, j:j + size:stride] for i in range(3) for j in range(3)]
    expected = np.max(windows, axis=0) if kind == "max" else np.nanmean(windows, axis=0)
    got = run_lib(lib, [_block(x, 8)], (1, 2) + expected.shape[2:] + (8,), "float32")
    np.testing.assert_allclose(_unblock(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_pooling_matches_numpy(target):
    """Max pooling 3x3/2 (padded) and a global average, blocked, as the generic rule schedules them."""
    spec = resolve_target(target)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 16, 15, 15)).astype("float32")
    data = te.placeholder((2, 2, 15, 15, 8), "float32", name="data")
    pooled = topi.nn.pool2d(data, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1], "max", layout="NCHW8c")
    mean = topi.nn.global_pool(data, "avg", layout="NCHW8c")
    lib, rule = _build([data, pooled, mean], spec)
    assert rule == "generic"
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)], constant_values=-np.inf)
    expected = np.max([padded[:, :, i:i + 15:2, j:j + 15:2] for i in range(3) for j in range(3)], axis=0)
    out_pool = tvm.runtime.tensor(np.zeros((2, 2, 8, 8, 8), "float32"))
    out_mean = tvm.runtime.tensor(np.zeros((2, 2, 1, 1, 8), "float32"))
    lib["main"](tvm.runtime.tensor(_block(x, 8)), out_pool, out_mean)
    np.testing.assert_allclose(_unblock(out_pool.numpy()), expected, rtol=1e-6)
    np.testing.assert_allclose(_unblock(out_mean.numpy())[:, :, 0, 0], x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_an_int8_average_pool_dequantizes_inside_its_window(target):
    """dequantize -> average pool 3x3/1 (padding not counted) -> quantize, as an int8 Inception block's branch
    pool is fused: the dequantize is inlined behind the padding, so the kernel is the pool's loop nest alone
    (left a serial pass of its own over the input, Inception-v3's nine pools took a quarter of the int8
    model). Exact against numpy's integer arithmetic, up to the rounding of the mean."""
    spec = resolve_target(target)
    lanes, channels, size, zero, scale = 8, 16, 13, 3, 0.05
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (1, channels, size, size)).astype("uint8")
    data = te.placeholder((1, channels // lanes, size, size, lanes), "uint8", name="data")
    dequantized = te.compute(data.shape, lambda *i: (data(*i).astype("int32") - zero).astype("float32") * scale,
                             name="dequantized")
    pooled = topi.nn.pool2d(dequantized, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], "avg", count_include_pad=False,
                            layout=f"NCHW{lanes}c")
    quantized = te.compute(pooled.shape, lambda *i: te.max(te.min(round_half_even(pooled(*i) / scale), 255.0),
                                                             0.0).astype("uint8"), name="quantized")
    mod, rule = schedule_func(te.create_prim_func([data, quantized]), spec)
    assert rule == "pool_nchwc"
    script = mod.script()
    assert 'sblock("dequantized")' not in script
    got = _unblock(run_lib(tvm.compile(mod, target=spec.tvm_target()), [_block(x, lanes)],
                           (1, channels // lanes, size, size, lanes), "uint8"))
    padded = np.pad(x.astype(np.float64) - zero, [(0, 0), (0, 0), (1, 1), (1, 1)])
    counts = np.pad(np.ones((size, size)), 1)
    sums = sum(padded[:, :, i:i + size, j:j + size] for i in range(3) for j in range(3))
    count = sum(counts[i:i + size, j:j + size] for i in range(3) for j in range(3))
    want = np.clip(np.round(sums / count), 0, 255)
    assert np.abs(got.astype(np.float64) - want).max() <= 1


def full_range(rng, shape, dtype):
    """Random values over the whole range of `dtype`, with its extremes present."""
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max + 1, shape).astype(dtype)
    values.flat[:32] = info.max
    values.flat[32:64] = info.min
    return values


def _isa_8_lanes(spec) -> str:
    """What an 8-lane int8 block runs on: VNNI on ymm where the CPU has it (native on a Zen 4 or a
    Xeon), else the exact AVX2 sequence."""
    return "vnni256" if spec.has("avx512_vnni") else "avx2"


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("data_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_conv_is_exact_over_thefull_range(target, data_dtype, shape):
    """Activations at 255 (or -128) against weights at -128: a saturating int16 step would show here. Rows
    of 17 and 71 compute whole register tiles and keep the real columns."""
    spec = resolve_target(target)
    lanes = 8
    rng = np.random.default_rng(2)
    n, c, size, o, k, stride, pad = shape
    x = full_range(rng, (n, c, size, size), data_dtype)
    weight = full_range(rng, (o, c, k, k), "int8")
    bias = rng.integers(-1000, 1000, o).astype("int32")
    lib, rule = _build(_conv_with_bias_relu(shape, lanes, data_dtype, vector_lanes(spec)), spec)
    assert rule == f"conv2d_nchwc_int8[quantvm_dot_8x4_{'u8' if data_dtype == 'uint8' else 's8'}s8_{_isa_8_lanes(spec)}]"
    expected = np.maximum(_reference_conv(x, weight, stride, pad, acc=np.int64) + bias[None, :, None, None], 0)
    out_shape = (n, o // lanes, expected.shape[2], expected.shape[3], lanes)
    got = run_lib(lib, [_block(x, lanes), _pack_weight(weight, lanes, True), _block(bias.reshape(1, o, 1, 1), lanes)],
               out_shape, "int32")
    np.testing.assert_array_equal(_unblock(got), expected)


AVX512_TARGETS = {  # target: (instruction the int8 kernel must use, lanes)
    "cascadelake": "vpdpbusd",
    "icelake-server": "vpdpbusd",
    "sapphirerapids": "vpdpbusd",
    "skylake-avx512": "vpmaddwd",
}


def _assembly(lib) -> str:
    return lib.mod.inspect_source("asm")


@pytest.mark.parametrize("target", sorted(AVX512_TARGETS))
@pytest.mark.parametrize("data_dtype", ["uint8", "int8"])
def test_avx512_int8_conv_compiles_to_its_dot_instruction(target, data_dtype):
    """These CPUs are not here: compile, and read the kernel's instructions on 512-bit registers."""
    spec = resolve_target(target)
    lib, rule = _build(_conv_with_bias_relu((1, 32, 14, 64, 3, 1, 1), 16, data_dtype), spec)
    isa = "vnni" if AVX512_TARGETS[target] == "vpdpbusd" else "avx512bw"
    assert rule == f"conv2d_nchwc_int8[quantvm_dot_16x4_{'u8' if data_dtype == 'uint8' else 's8'}s8_{isa}]"
    instruction = AVX512_TARGETS[target]
    assert re.search(rf"\b{instruction}\s+[^\n]*%zmm", _assembly(lib)), f"no {instruction} on zmm registers"


def bounded_extremes(rng, shape) -> np.ndarray:
    """s8 weights [O, C, KH, KW] whose pairs of input channels sum to at most PAIR_BOUND in magnitude, many
    exactly at it (127 + 1, 64 + 64, -100 - 28): where `vpmaddubsw` would saturate were the bound one more."""
    weight = rng.integers(-64, 65, shape).astype(np.int8)
    firsts = rng.choice([127, 64, -100, -127], size=weight[:, 0::2].shape)
    weight[:, 0::2] = firsts
    weight[:, 1::2] = (np.sign(firsts) * (PAIR_BOUND - np.abs(firsts))).astype(np.int8)
    assert pairs_are_bounded(weight.transpose(0, 2, 3, 1).reshape(*shape[:1], *shape[2:], -1, 4))
    return weight


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("data_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("shape", [CONV_SHAPES[1], CONV_SHAPES[3], CONV_SHAPES[6]], ids=lambda s: "x".join(map(str, s)))
def test_int8_conv_with_bounded_weight_pairs_is_exact_at_the_bound(target, data_dtype, shape):
    """A conv marked as having bounded weight pairs runs `vpmaddubsw` on a CPU without VNNI: activations at
    255 (or -128, which goes in as 0 with 128 * w taken off) against pairs summing to exactly 128 give int16
    sums of 32640, one short of saturating; the result is the int64 reference's."""
    spec = resolve_target(target)
    rng = np.random.default_rng(5)
    n, c, size, o, k, stride, pad = shape
    x = full_range(rng, (n, c, size, size), data_dtype)
    weight = bounded_extremes(rng, (o, c, k, k))
    bias = rng.integers(-1000, 1000, o).astype("int32")
    lib, rule = _build(_conv_with_bias_relu(shape, 8, data_dtype, vector_lanes(spec), bounded_pairs=True), spec)
    isa = "vnni256" if spec.has("avx512_vnni") else "avx2_bounded"
    assert rule == f"conv2d_nchwc_int8[quantvm_dot_8x4_{'u8' if data_dtype == 'uint8' else 's8'}s8_{isa}]"
    expected = np.maximum(_reference_conv(x, weight, stride, pad, acc=np.int64) + bias[None, :, None, None], 0)
    out_shape = (n, o // 8, expected.shape[2], expected.shape[3], 8)
    got = run_lib(lib, [_block(x, 8), _pack_weight(weight, 8, True), _block(bias.reshape(1, o, 1, 1), 8)],
                  out_shape, "int32")
    np.testing.assert_array_equal(_unblock(got), expected)


@pytest.mark.parametrize("target, lanes, register", [("avx2", 8, "ymm"), ("skylake-avx512", 16, "zmm")])
def test_bounded_int8_conv_compiles_to_vpmaddubsw_without_vnni(target, lanes, register):
    """Read, not run (skylake-avx512 may not be here): the bounded form's `vpmaddubsw` on full vectors."""
    spec = resolve_target(target)
    lib, rule = _build(_conv_with_bias_relu((1, 32, 14, 64, 3, 1, 1), lanes, "uint8", bounded_pairs=True), spec)
    assert rule.endswith("_bounded]"), rule
    assert re.search(rf"\bvpmaddubsw\s+[^\n]*%{register}", _assembly(lib))


@pytest.mark.parametrize("target", sorted(AVX512_TARGETS))
def test_avx512_fp32_conv_uses_512_bit_fma(target):
    spec = resolve_target(target)
    lib, rule = _build(_conv_with_bias_relu((1, 32, 14, 64, 3, 1, 1), 16, "float32"), spec)
    assert rule == "conv2d_nchwc"
    assert re.search(r"\bvfmadd\w*ps\s+[^\n]*%zmm", _assembly(lib))


@pytest.mark.parametrize("target", ["cascadelake", "avx2"])
@pytest.mark.parametrize("data_dtype,bounded", [("uint8", False), ("uint8", True), ("int8", True), ("float32", False)])
@pytest.mark.parametrize("width", [28, 112])
def test_conv_register_tile_stays_in_registers(target, data_dtype, bounded, width):
    """A 1x1 conv on 16 channels (MobileNetV2's expansions): its accumulators stay registers. A tile stored
    in a loop read them from the stack, which LLVM zeroed with a memset call on every tile; a tile whose
    buffer TVM allocates as workspace (a "local" buffer, or 1024 bytes and more: 7 x 3 vectors of 16) is
    heap memory, zeroed, stored and reloaded on every tile. Either ran such convs at half speed or worse."""
    spec = resolve_target(target)
    lib, _ = _build(_conv_with_bias_relu((1, 16, width, 96, 1, 1, 0), vector_lanes(spec), data_dtype,
                                         bounded_pairs=bounded), spec)
    asm = _assembly(lib)
    assert "memset" not in asm
    assert "TVMBackendAllocWorkspace" not in asm


def _int8_dense(m, k, n, lanes, data_dtype, whole_rows=None, bounded_pairs=False):
    """x [m, k] . w [k, n] + bias, with w stored packed [n/lanes, k/4, lanes, 4] and unpacked in the
    kernel, as targets.layout leaves an int8 FC; `whole_rows`: computed over that many rows (targets.dense)."""
    data = te.placeholder((m, k), data_dtype, name="x")
    packed = te.placeholder((n // lanes, k // 4, lanes, 4), "int8", name="packed")
    weight = te.compute((k, n), lambda i, j: packed[j // lanes, i // 4, j % lanes, i % 4], name="te_layout_transform")
    red = te.reduce_axis((0, k), name="k")
    out = matmul_whole_rows(data, weight, whole_rows, bounded_pairs) if whole_rows or bounded_pairs else te.compute(
        (m, n), lambda i, j: te.sum(data[i, red].astype("int32") * weight[red, j].astype("int32"), axis=red),
        name="matmul")
    bias = te.placeholder((n,), "int32", name="bias")
    return [data, packed, bias, te.compute((m, n), lambda i, j: out[i, j] + bias[j], name="T_add")]


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("data_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("m", [1, 8])
def test_int8_dense_is_exact_over_thefull_range(target, data_dtype, m):
    spec = resolve_target(target)
    rng = np.random.default_rng(3)
    k, n, lanes = 64, 40, 8
    x = full_range(rng, (m, k), data_dtype)
    weight = full_range(rng, (k, n), "int8")
    bias = rng.integers(-1000, 1000, n).astype("int32")
    lib, rule = _build(_int8_dense(m, k, n, lanes, data_dtype), spec)
    assert rule == f"matmul_int8[quantvm_dot_8x4_{'u8' if data_dtype == 'uint8' else 's8'}s8_{_isa_8_lanes(spec)}]"
    packed = np.ascontiguousarray(weight.reshape(k // 4, 4, n // lanes, lanes).transpose(2, 0, 3, 1))
    got = run_lib(lib, [x, packed, bias], (m, n), "int32")
    np.testing.assert_array_equal(got, x.astype(np.int64) @ weight.astype(np.int64) + bias)


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("data_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("m", [1, 197])
def test_int8_dense_with_bounded_weight_pairs_is_exact_at_the_bound(target, data_dtype, m):
    """An FC marked as having bounded weight pairs (`vpmaddubsw` on a CPU without VNNI), full-range data
    against pairs summing to 128, rows a tile divides and 197 (whole tiles computed, the real rows kept)."""
    spec = resolve_target(target)
    rng = np.random.default_rng(7)
    k, n, lanes = 64, 40, 8
    x = full_range(rng, (m, k), data_dtype)
    weight = bounded_extremes(rng, (n, k, 1, 1))[:, :, 0, 0].T
    bias = rng.integers(-1000, 1000, n).astype("int32")
    tile_rows, _, ragged = matmul_tile(m, n // lanes, lanes)
    rows = -(-m // tile_rows) * tile_rows if ragged else None
    lib, rule = _build(_int8_dense(m, k, n, lanes, data_dtype, rows, bounded_pairs=True), spec)
    isa = "vnni256" if spec.has("avx512_vnni") else "avx2_bounded"
    assert rule == f"matmul_int8[quantvm_dot_8x4_{'u8' if data_dtype == 'uint8' else 's8'}s8_{isa}]"
    packed = np.ascontiguousarray(weight.reshape(k // 4, 4, n // lanes, lanes).transpose(2, 0, 3, 1))
    got = run_lib(lib, [x, packed, bias], (m, n), "int32")
    np.testing.assert_array_equal(got, x.astype(np.int64) @ weight.astype(np.int64) + bias)


@pytest.mark.parametrize("whole_tiles", [True, False])
def test_int8_dense_on_a_prime_row_count_is_tensorized_and_exact(whole_tiles):
    """ViT's 197 tokens: no row tile divides them. Legalized (targets.dense), the FC computes whole tiles of
    rows and keeps the real ones; as TVM legalizes it, the rule falls back to an exact (1-row) tile. Either
    way the dot intrinsic runs (a cut-short tile left the kernel unscheduled: 13 s for ViT-B int8)."""
    spec = resolve_target("native")
    rng = np.random.default_rng(5)
    m, k, n, lanes = 197, 64, 64, vector_lanes(spec)
    x, weight = full_range(rng, (m, k), "uint8"), full_range(rng, (k, n), "int8")
    bias = rng.integers(-1000, 1000, n).astype("int32")
    tile_rows, _, ragged = matmul_tile(m, n // lanes, lanes)
    assert ragged and m % tile_rows
    lib, rule = _build(_int8_dense(m, k, n, lanes, "uint8", -(-m // tile_rows) * tile_rows if whole_tiles else None),
                       spec)
    assert rule.startswith("matmul_int8[")
    packed = np.ascontiguousarray(weight.reshape(k // 4, 4, n // lanes, lanes).transpose(2, 0, 3, 1))
    got = run_lib(lib, [x, packed, bias], (m, n), "int32")
    np.testing.assert_array_equal(got, x.astype(np.int64) @ weight.astype(np.int64) + bias)


@pytest.mark.parametrize("lanes", [16, 8])
def test_cascadelake_int8_dense_uses_vpdpbusd(lanes):
    """A 1000-wide FC (ResNet's) is packed in 8-lane blocks: vpdpbusd on ymm registers."""
    lib, rule = _build(_int8_dense(4, 64, 48, lanes, "uint8"), resolve_target("cascadelake"))
    assert rule == f"matmul_int8[quantvm_dot_{lanes}x4_u8s8_{'vnni' if lanes == 16 else 'vnni256'}]"
    register = "zmm" if lanes == 16 else "ymm"
    assert re.search(rf"\bvpdpbusd\s+[^\n]*%{register}", _assembly(lib))


def assembly_by_kernel(executable) -> dict[str, str]:
    """Each kernel's assembly: its `<name>_compute_` body and the parallel lambdas LLVM emits after it."""
    asm = executable.mod.imports[0].inspect_source("asm")
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^(\w+)_compute_:", asm, re.M)]
    ends = [start for start, _ in starts[1:]] + [len(asm)]
    return {name: asm[start:end] for (start, name), end in zip(starts, ends)}


def test_resnet50_int8_for_cascadelake_has_vpdpbusd_in_every_conv_and_dense_kernel():
    import compiler
    from tests.fixtures import resnet50

    rng = np.random.default_rng(4)
    calib = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32)]
    built = compiler.compile(resnet50(rng), target="cascadelake", calib=calib, calib_mode="naive")
    assert built.report.quantization.int8_ops == {"conv2d": 53, "avg_pool": 1, "dense": 1}
    kernels = assembly_by_kernel(built.executable)
    int8 = {name: body for name, body in kernels.items()
            if ("conv2d" in name or "matmul" in name) and "astype" in name}  # int8: s32 accumulators cast
    assert len(int8) == len([n for n in kernels if "conv2d" in n or "matmul" in n])
    counts = {name: len(re.findall(r"\bvpdpbusd\b", body)) for name, body in int8.items()}
    assert all(counts.values()), {name: c for name, c in counts.items() if not c}
    assert any("matmul" in name for name in counts)


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_unblocking_layout_transform_matches_numpy(target):
    """NCHW{c} -> NCHW as Relax legalizes it (a copy in the source's loop order, the write re-indexed) stores
    whole vectors along the width (the transpose tile), and moves every value."""
    from tvm import s_tir

    spec = resolve_target(target)
    blocked = te.placeholder((1, 3, 5, 32, 16), "float32", name="blocked")
    copy = te.compute(blocked.shape, lambda *i: blocked(*i), name="unblock")
    sch = s_tir.Schedule(te.create_prim_func([blocked, copy]))
    sch.transform_layout("unblock", ("write", 0), lambda n, c, h, w, lane: (n, c * 16 + lane, h, w))
    mod, rule = schedule_func(sch.mod["main"], spec)
    assert rule == "generic"
    assert "T.vectorized" in mod.script() and "T.unroll" in mod.script()
    lib = tvm.compile(mod, target=spec.tvm_target())
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 32, 16)).astype("float32")
    np.testing.assert_array_equal(run_lib(lib, [x], (1, 48, 5, 32), "float32"), _unblock(x))


@pytest.mark.parametrize("width", [1000, 256, 36])
def test_blocking_layout_transform_of_long_rows_matches_numpy(width):
    """NCHW -> NCHW16c of 16 channels (the write indexed by the channel itself) over rows longer than a tile
    (a 1-D input of 1000 steps: tiles of 8 steps; 256: of 16; 36: of 4) stores whole vectors of channels, and
    moves every value."""
    from tvm import s_tir

    spec = resolve_target("native")
    plain = te.placeholder((1, 16, 1, width), "float32", name="plain")
    copy = te.compute(plain.shape, lambda *i: plain(*i), name="block")
    sch = s_tir.Schedule(te.create_prim_func([plain, copy]))
    sch.transform_layout("block", ("write", 0), lambda n, c, h, w: (n, c // 16, h, w, c % 16))
    mod, rule = schedule_func(sch.mod["main"], spec)
    assert rule == "generic"
    assert "T.vectorized" in mod.script() and "T.unroll" in mod.script()
    lib = tvm.compile(mod, target=spec.tvm_target())
    x = np.random.default_rng(0).standard_normal((1, 16, 1, width)).astype("float32")
    np.testing.assert_array_equal(run_lib(lib, [x], (1, 1, 1, width, 16), "float32"), _block(x, 16))


@pytest.mark.parametrize("target", HOST_TARGETS)
def test_blocking_an_image_keeps_each_row_on_one_thread(target):
    """NCHW -> NCHW3c of a 3-channel image (the first conv's input): threads split the rows, never the
    channels, so no two threads write the same cache line (split by channel, 2 threads blocked a 320x320
    image 5x slower than one); every value moves."""
    from tvm import s_tir

    spec = resolve_target(target)
    image = te.placeholder((2, 3, 160, 320), "float32", name="image")
    copy = te.compute(image.shape, lambda *i: image(*i), name="block")
    sch = s_tir.Schedule(te.create_prim_func([image, copy]))
    sch.transform_layout("block", ("write", 0), lambda n, c, h, w: (n, c // 3, h, w, c % 3))
    mod, rule = schedule_func(sch.mod["main"], spec)
    assert rule == "generic"
    parallel = re.findall(r"T\.parallel\((?:T\.int64\()?(\d+)", mod.script())
    assert parallel == [str(2 * 160)]  # images x rows: the channel loop is inside
    lib = tvm.compile(mod, target=spec.tvm_target())
    x = np.random.default_rng(0).standard_normal((2, 3, 160, 320)).astype("float32")
    np.testing.assert_array_equal(run_lib(lib, [x], (2, 1, 160, 320, 3), "float32"), _block(x, 3))


def test_ragged_fc_tile_is_chosen_by_fmas_per_load():
    """ViT's 197 rows over 48 column vectors: the tile with the most accumulators is 25 rows x 1 vector,
    26 loads for 25 FMAs (a 3072-deep FC ran at a quarter of its speed); the chosen one loads at most 2
    vectors per 3 FMAs and keeps at least MIN_TILE_ACCUMULATORS."""
    from targets.register_tiles import MIN_TILE_ACCUMULATORS

    rows, vectors, ragged = matmul_tile(197, 48, 16)
    assert ragged and rows * vectors >= MIN_TILE_ACCUMULATORS
    assert rows * vectors / (rows + vectors) >= 1.5
