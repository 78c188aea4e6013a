"""Residual adds read the int8 copy of a tensor the next int8 op quantizes (relay_passes.quantized_residuals):
the rewrite on a small graph, against numpy; where another fp32 reader keeps the tensor, nothing changes; in a
compiled pair of bottlenecks, the block's kernel stores no fp32 copy and the result stays near onnxruntime's."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

import compiler
from relay_passes.analysis import op_name
from relay_passes.quantized_residuals import ResidualsFromQuantized
from tests import fixtures
from tests.fixtures import GraphBuilder, onnxruntime_outputs, random_inputs

SCALE = 0.05


def _block(other_reader: str | None):
    """y = relu(x); q = quantize(y) read by a stand-in int8 op (z = q as fp32 * 2); out = z + y. `other_reader`:
    'op' (y also read by a sigmoid) or 'output' (y also returned)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(x)) if other_reader != "output" else bb.emit_output(relax.op.nn.relu(x))
            q = bb.emit(relax.op.quantize(y, relax.const(np.float32(SCALE)), relax.const(0, "uint8"), axis=-1,
                                          out_dtype="uint8"))
            z = bb.emit(relax.op.multiply(relax.op.astype(q, "float32"), relax.const(np.float32(2))))
            outputs = [bb.emit(relax.op.add(z, y))]
            if other_reader == "op":
                outputs.append(bb.emit(relax.op.sigmoid(y)))
            if other_reader == "output":
                outputs.append(y)
            out = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(out)
    return bb.get()


def _ops(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(mod["main"], lambda e: names.append(op_name(e)) if op_name(e) else None)
    return names


def _run(mod, x):
    with tvm.target.Target("llvm"):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return [o.numpy() for o in vm["main"](tvm.runtime.tensor(x))]


def test_residual_add_reads_the_dequantized_copy(rng):
    mod = _block(None)
    rewritten = ResidualsFromQuantized(mod)
    assert _ops(rewritten).count("relax.dequantize") == 1 and _ops(mod).count("relax.dequantize") == 0
    x = rng.uniform(-1, 2, (1, 8, 4, 4)).astype(np.float32)
    y = np.maximum(x, 0)
    q = np.clip(np.round(y / SCALE), 0, 255)
    (got,) = _run(rewritten, x)
    np.testing.assert_allclose(got, q * 2 + q * SCALE, rtol=1e-6, atol=1e-6)
    (fp32_skip,) = _run(mod, x)
    np.testing.assert_allclose(fp32_skip, q * 2 + y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("other_reader", ["op", "output"])
def test_a_tensor_with_another_fp32_reader_keeps_its_fp32_skip(other_reader):
    mod = _block(other_reader)
    assert tvm_ffi.structural_equal(ResidualsFromQuantized(mod), mod)


def test_bottleneck_blocks_store_no_fp32_copy_of_a_block_output(rng, monkeypatch):
    """Between two identity bottlenecks the first block's output is read by the second's residual Add and
    quantized for its first conv: the block's last kernel stores only the int8 copy, where with fp32 skips it
    stored both; the same kernels, and both builds near onnxruntime's fp32."""
    import relay_passes.quantize

    g = GraphBuilder(rng)
    y = fixtures.bottleneck(g, "data", "block1", 16, 8, 16)
    y = fixtures.bottleneck(g, y, "block2", 16, 8, 16)
    model = g.model("two_blocks", {"data": (1, 16, 12, 12)}, [y])
    calib = [random_inputs(model, rng) for _ in range(2)]
    feeds = random_inputs(model, rng)
    quantized = compiler.compile(model, target="native", calib=calib, bias_correction=None)
    monkeypatch.setattr(relay_passes.quantize, "ResidualsFromQuantized", lambda mod: mod)
    fp32_skip = compiler.compile(model, target="native", calib=calib, bias_correction=None)
    assert quantized.report.elementwise["second_outputs"] == 0
    assert fp32_skip.report.elementwise["second_outputs"] == 1
    assert quantized.report.kernels == fp32_skip.report.kernels
    assert quantized.report.schedules.unscheduled == {}
    expected = onnxruntime_outputs(model, feeds)[0]
    for built in (quantized, fp32_skip):
        assert np.abs(built.run(**feeds)[0] - expected).max() <= 0.05 * np.abs(expected).max()
