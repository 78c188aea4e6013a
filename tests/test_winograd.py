"""Winograd F(4x4, 3x3) and F(2x2, 3x3) for fp32 3x3 convs of stride 1 (targets.winograd, chosen by
targets.winograd_convs): numbers against onnxruntime on each target this host runs, with the conv's fused bias,
residual add and activation; other targets' inner loops read from their assembly; the tile each map gets; the
convs it does not compute stay direct."""

from __future__ import annotations

import re

import numpy as np
import pytest

import compiler
from tests.fixtures import GraphBuilder, onnxruntime_outputs
from tests.host_targets import HOST_TARGETS
from tests.test_kernels import assembly_by_kernel

WINOGRAD = "conv2d_winograd_nchwc"
DIRECT = "conv2d_nchwc"


def conv_model(rng, channels: int, out_channels: int, size: int, batch: int = 1, pad: int = 1, stride: int = 1,
               dilation: int = 1, groups: int = 1, kernel: int = 3):
    """Conv (+bias) [+ the input, where the shapes allow] -> Relu -> a second 3x3 conv: two convs, one fused
    with a residual add."""
    g = GraphBuilder(rng)
    weight = rng.standard_normal((out_channels, channels // groups, kernel, kernel)) / np.sqrt(kernel * kernel * channels)
    y = g.op("Conv", ["x", g.const("w1", weight.astype(np.float32)),
                      g.const("b1", rng.standard_normal(out_channels).astype(np.float32))], "conv1",
             kernel_shape=[kernel, kernel], pads=[pad] * 4, strides=[stride] * 2, dilations=[dilation] * 2,
             group=groups)
    out_size = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    if out_size == size and out_channels == channels:
        y = g.op("Add", [y, "x"], "residual")
    y = g.op("Relu", [y], "relu")
    second = rng.standard_normal((out_channels, out_channels, 3, 3)) / np.sqrt(9 * out_channels)
    y = g.op("Conv", [y, g.const("w2", second.astype(np.float32))], "conv2", kernel_shape=[3, 3], pads=[1] * 4)
    return g.model("winograd", {"x": [batch, channels, size, size]}, [y])


def _tiled_rules(built) -> list[str]:
    """The convs' rules, a Winograd one with its tile: conv2d_winograd_nchwc[F(4x4,3x3)]."""
    return [rule for rule in built.report.schedules.applied.values() if rule.split("[")[0] in (WINOGRAD, DIRECT)]


def _rules(built) -> list[str]:
    return [rule.split("[")[0] for rule in _tiled_rules(built)]


def _matches_onnxruntime(model, rng, **options):
    feeds = {"x": rng.standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
             .astype(np.float32)}
    built = compiler.compile(model, **options)
    (got,), (want,) = built.run(**feeds), onnxruntime_outputs(model, feeds)
    # F(4x4, 3x3) rounds about 3x as much as a direct conv: a few 1e-6 of the output's range
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max()
    return built


# (in channels, out channels, size, batch, padding, dilation): a residual block; a 7x7 map (two 4x4 tiles a
# side, the last cut short) at batch 8; out != in channels on an odd map at batch 2; no padding (a 9x9 map to
# 7x7, batch 8); dilation 2 (FCN's and DeepLab's backbones: 4 phases of tiles) and 3, on maps no phase's
# tiles divide. The 14x14 and 12x12 maps have too few tiles for F(4x4) and run F(2x2), the others F(4x4).
SHAPES = [(32, 32, 14, 1, 1, 1), (16, 32, 7, 8, 1, 1), (32, 16, 13, 2, 1, 1), (16, 16, 9, 8, 0, 1),
          (32, 32, 18, 1, 2, 2), (16, 16, 12, 1, 2, 2), (16, 32, 23, 2, 3, 3)]


@pytest.mark.parametrize("target", HOST_TARGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_winograd_convs_match_onnxruntime(target, shape, rng):
    channels, out_channels, size, batch, pad, dilation = shape
    model = conv_model(rng, channels, out_channels, size, batch, pad, dilation=dilation)
    built = _matches_onnxruntime(model, rng, target=target)
    assert _rules(built) == [WINOGRAD] * 2


@pytest.mark.parametrize("form", [{"stride": 2}, {"groups": 2}, {"kernel": 1}, {"size": 5}, {"dilation": 4}],
                         ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_convs_winograd_does_not_compute_stay_direct(form, rng):
    """Strided, grouped and 1x1 convs; a 5x5 map and a 6x6 output of dilation 4, where whole 4x4 tiles (a side:
    two; one for each of 4 x 4 phases) would do more than half the direct conv's multiply-adds (the model's
    second conv, a plain 3x3, is Winograd's but on the 5x5 map)."""
    size = form.pop("size", 12)
    built = _matches_onnxruntime(conv_model(rng, 32, 32, size, **form), rng, target="native")
    assert sorted(_rules(built)) == ([DIRECT, DIRECT] if size == 5 else [DIRECT, WINOGRAD])


@pytest.mark.parametrize("size,batch,tile", [(56, 1, 4), (28, 1, 4), (14, 1, 2), (7, 1, None), (7, 8, 4)])
def test_each_map_gets_the_tile_its_weights_pay_for(size, batch, tile, rng):
    """F(4x4) where each transformed weight serves at least MIN_TILES_PER_WEIGHT tiles (a 28x28 map: 49), else
    F(2x2) (14x14: 16 tiles of 4x4), else direct (a 7x7 map at batch 1: F(2x2) would do over half the direct
    work); a batch's images share the weights (7x7 at batch 8: 32 tiles)."""
    from targets.winograd_convs import MIN_TILES_PER_WEIGHT

    assert (28 // 4) ** 2 >= MIN_TILES_PER_WEIGHT > (14 // 4 + 1) ** 2
    built = compiler.compile(conv_model(rng, 16, 16, size, batch), target="native")
    want = DIRECT if tile is None else f"{WINOGRAD}[F({tile}x{tile},3x3)]"
    assert _tiled_rules(built) == [want] * 2


def test_winograd_off_keeps_every_conv_direct(rng):
    built = _matches_onnxruntime(conv_model(rng, 32, 32, 14), rng, target="native", winograd=False)
    assert _rules(built) == [DIRECT] * 2


def test_int8_convs_stay_direct_and_an_excluded_fp32_conv_is_winograd(rng):
    model = conv_model(rng, 32, 32, 14)
    calib = [rng.standard_normal((1, 32, 14, 14)).astype(np.float32) for _ in range(2)]
    built = compiler.compile(model, target="native", calib=calib, exclude_layers=["conv2"])
    assert built.report.quantization.int8_ops["conv2d"] == 1
    rules = sorted(r for r in built.report.schedules.applied.values() if r.startswith("conv2d"))
    assert len(rules) == 2 and rules[0].startswith("conv2d_nchwc_int8") and rules[1].startswith(WINOGRAD)


@pytest.mark.parametrize("target,register,lanes", [("cascadelake", "zmm", 16), ("avx2", "ymm", 8)])
def test_winograd_gemm_broadcasts_the_transformed_input_onto_weight_vectors(target, register, lanes, rng):
    """The GEMMs' inner loop on each target's widest vectors: a register tile of FMAs, each the transformed
    input's broadcast (folded into the FMA, or one vbroadcastss for a tile's channel blocks) times a weight
    vector (compiled and read, not run)."""
    built = compiler.compile(conv_model(rng, 64, 64, 28), target=target)
    bodies = [asm for name, asm in assembly_by_kernel(built.executable).items() if "winograd" in name]
    assert len(bodies) == 2
    for body in bodies:
        assert re.search(rf"vbroadcastss\s+[^\n]*%{register}|\{{1to{lanes}\}}", body)
        fmas = re.findall(rf"vfmadd231ps\s+[^\n]*%{register}\d+, %{register}\d+$", body, re.MULTILINE)
        assert len(fmas) >= 8  # a register tile of at least 8 accumulators


def test_every_register_tile_tuning_tries_computes_the_default_kernel(rng):
    """tune() searches the GEMMs' register tile (tiles x channel blocks) from the rules' choice: other points
    of that space compute the same kernel."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from compiler.build import target_with_threads
    from compiler.tuner import _extract
    from targets import resolve_target
    from targets.tuning import tile_decisions

    spec = target_with_threads(resolve_target("native"), 2)
    _, tasks, _ = _extract(conv_model(rng, 32, 64, 28), spec, None, None, {})
    (task, default), = [(t, s) for t, s in tasks if "winograd" in t.task_name and "add" in t.task_name]
    tiles, channel_blocks = tile_decisions(default.trace)[:2]
    inputs = [rng.uniform(-1, 1, [int(d) for d in info.shape]).astype(info.dtype)
              for info in ArgInfo.from_prim_func(task.dispatched[0]["main"])]

    def run(mod):
        args = [tvm.runtime.tensor(a) for a in inputs]
        tvm.compile(mod, target=spec.tvm_target())(*args)
        return args[-1].numpy()

    expected = run(default.mod)
    samples = [inst for inst in default.trace.insts if inst.kind.name == "SamplePerfectTile"]
    inner = 2 if tiles[1] != 2 else 1  # a tile other than the rules' (AVX2's is 2 wide already)
    variants = [(samples[0], [tiles[0] * tiles[1] // inner, inner]),
                (samples[1], [channel_blocks[0] * channel_blocks[1], 1])]
    for sample, decision in variants:
        assert decision != tiles and decision != channel_blocks
        variant = Schedule(task.dispatched[0])
        default.trace.with_decision(sample, decision, remove_postproc=True).apply_to_schedule(variant,
                                                                                              remove_postproc=True)
        np.testing.assert_allclose(run(variant.mod), expected, rtol=1e-6, atol=1e-6)


def test_the_command_line_keeps_convs_direct_with_no_winograd(tmp_path, rng):
    import json

    from tests.test_cli import quantvm

    model = tmp_path / "convs.onnx"
    model.write_bytes(conv_model(rng, 32, 32, 14).SerializeToString())
    for flags, rule in (([], WINOGRAD), (["--no-winograd"], DIRECT)):
        report = tmp_path / "report.json"
        quantvm("compile", model, "-t", "native", "-o", tmp_path / "m.so", "--report", report, *flags)
        rules = [r for r in json.loads(report.read_text())["schedules"]["applied"].values() if r.startswith("conv2d")]
        assert [r.split("[")[0] for r in rules] == [rule] * 2
