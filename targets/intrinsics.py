"""u8 x s8 -> s32 dot-product tensor intrinsics: C[lane] += sum_k A[k] * B[lane, k], k < 4.

- VNNI (cascadelake, icelake-server, sapphirerapids): one `vpdpbusd`. TVM 0.27's stock `dot_16x4_vnni`
  passes <16 x i32> operands that LLVM 22 rejects; this one passes the <64 x i8> operands it expects.
- AVX-512BW (skylake-avx512) and AVX2, any weight: exact. `vpmaddubsw` would saturate its int16 pair sums
  (255*127*2 > 32767), so bytes are split into even and odd halves, widened to int16 in registers, and
  multiplied with `vpmaddwd`, whose int32 pair sums cannot overflow.
- The same CPUs, a constant weight whose pairs are bounded (|w[2j]| + |w[2j+1]| <= PAIR_BOUND for every lane,
  which the quantizer ensures there: relay_passes.quantize): `vpmaddubsw` then cannot saturate
  (255 * 128 < 32767), and one `vpmaddubsw` and one `vpmaddwd` by ones do what `vpdpbusd` does. On a Zen 3
  this is 1.5x the exact form's speed (`vpmaddwd` pairs need twice the multiplies and adds).
"""

from __future__ import annotations

import numpy as np
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from targets.register_tiles import ACCUMULATOR_SCOPE
from targets.registry import TargetSpec

GROUP = 4  # input channels per 32-bit lane
PAIR_BOUND = 128  # |w0| + |w1| of a bounded weight's pair: 255 * 128 = 32640 fits vpmaddubsw's int16 sum
SIGN_FLIP = 128  # a dot that reads u8 takes s8 a as a + 128 (a xor 0x80): the quantizer's and the kernels' offset
FLIP_BYTES = int.from_bytes(bytes([SIGN_FLIP] * 4), "little", signed=True)  # 0x80808080: xor flips 4 bytes


def _desc(lanes: int, a_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((GROUP,), a_dtype, offset_factor=1),
             b: T.Buffer((lanes, GROUP), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope=ACCUMULATOR_SCOPE)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:GROUP], b[0:lanes, 0:GROUP])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, GROUP):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    return desc


def _u8_dot_impl(lanes: int, a_dtype: str, accumulate):
    """C += A . B through `accumulate(c, a_bytes, b_bytes)`, an instruction that reads A as u8. s8 A: a + 128
    (a xor 0x80) goes in and 128*b comes off again (a second call from zero); int32 wraparound makes the
    difference exact."""
    signed = a_dtype == "int8"
    i32, u8, i8 = f"int32x{lanes}", f"uint8x{4 * lanes}", f"int8x{4 * lanes}"

    # Expressions, not names assigned in the body: TVMScript makes an assigned name a "local" buffer, which
    # TVM allocates as workspace (heap memory that every call stores to and reloads).
    def weight_bytes(b):
        return b.vload([0, 0], dtype=i8)

    def data_bytes(a):
        if signed:  # the flip on the scalar, before the broadcast: LLVM 22 hangs compiling the vector form
            # for icelake-server and sapphirerapids
            word = T.reinterpret(a.vload([0], "int8x4"), dtype="int32") ^ T.int32(FLIP_BYTES)
        else:
            word = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
        return T.reinterpret(T.broadcast(word, lanes), dtype=u8)

    def flip_offset(b):  # the dot of the flip (128 in every byte) with b, from zero
        return accumulate(T.broadcast(T.int32(0), lanes), T.reinterpret(T.broadcast(T.int32(FLIP_BYTES), lanes),
                                                                       dtype=u8), weight_bytes(b))

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((GROUP,), a_dtype, offset_factor=1),
             b: T.Buffer((lanes, GROUP), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope=ACCUMULATOR_SCOPE)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:GROUP], b[0:lanes, 0:GROUP])
            T.writes(c[0:lanes])
            if signed:
                c[T.ramp(T.int32(0), 1, lanes)] = accumulate(
                    c.vload([0], dtype=i32), data_bytes(a), weight_bytes(b)) - flip_offset(b)
            else:
                c[T.ramp(T.int32(0), 1, lanes)] = accumulate(c.vload([0], dtype=i32), data_bytes(a), weight_bytes(b))

    return impl


def _vpdpbusd(lanes: int):
    """One vpdpbusd. 16 lanes: zmm; 8: ymm (AVX512VL)."""
    name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    def accumulate(c, a_bytes, b_bytes):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), c, a_bytes, b_bytes, dtype=f"int32x{lanes}")

    return accumulate


def _vpmaddubsw(lanes: int, maddubs: str, madd: str):
    """`vpmaddubsw` (exact for a bounded weight: its int16 pair sums stay below 32767), then `vpmaddwd` by
    ones sums those pairs into int32."""

    def accumulate(c, a_bytes, b_bytes):
        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(maddubs), a_bytes, b_bytes,
                                        dtype=f"int16x{2 * lanes}")
        return c + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(madd), pairs,
                                           T.broadcast(T.int16(1), 2 * lanes), dtype=f"int32x{lanes}")

    return accumulate


def _exact_impl(lanes: int, madd: str, a_dtype: str):
    """Even and odd bytes as int16 pairs, two `vpmaddwd`s: exact for the full u8 and s8 ranges.
    A's bytes are zero-extended (u8) or sign-extended (s8). Written as expressions, not assigned names
    (see _u8_dot_impl)."""
    halves = 2 * lanes
    signed = a_dtype == "int8"
    i32 = f"int32x{lanes}"
    i16 = f"int16x{halves}"

    def eight():
        return T.broadcast(T.int16(8), halves)

    def low_byte():
        return T.broadcast(T.int16(0xFF), halves)

    def a_pairs(a):
        return T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], f"{a_dtype}x4"), dtype="int32"), lanes), dtype=i16)

    def a_even(a):
        return ((a_pairs(a) << eight()) >> eight()) if signed else (a_pairs(a) & low_byte())

    def a_odd(a):
        return (a_pairs(a) >> eight()) if signed else ((a_pairs(a) >> eight()) & low_byte())

    def b_pairs(b):
        return T.reinterpret(b.vload([0, 0], dtype=f"int8x{4 * lanes}"), dtype=i16)

    def madd_pairs(x, y):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(madd), x, y, dtype=i32)

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((GROUP,), a_dtype, offset_factor=1),
             b: T.Buffer((lanes, GROUP), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope=ACCUMULATOR_SCOPE)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:GROUP], b[0:lanes, 0:GROUP])
            T.writes(c[0:lanes])
            c[T.ramp(T.int32(0), 1, lanes)] = (
                c.vload([0], dtype=i32)
                + madd_pairs(a_even(a), (b_pairs(b) << eight()) >> eight())
                + madd_pairs(a_odd(a), b_pairs(b) >> eight()))

    return impl


_IMPLEMENTATIONS = {  # isa: (lanes, implementation for an activation dtype)
    "vnni": (16, lambda a_dtype: _u8_dot_impl(16, a_dtype, _vpdpbusd(16))),
    "vnni256": (8, lambda a_dtype: _u8_dot_impl(8, a_dtype, _vpdpbusd(8))),
    "avx512bw": (16, lambda a_dtype: _exact_impl(16, "llvm.x86.avx512.pmaddw.d.512", a_dtype)),
    "avx2": (8, lambda a_dtype: _exact_impl(8, "llvm.x86.avx2.pmadd.wd", a_dtype)),
    "avx512bw_bounded": (16, lambda a_dtype: _u8_dot_impl(16, a_dtype, _vpmaddubsw(
        16, "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"))),
    "avx2_bounded": (8, lambda a_dtype: _u8_dot_impl(8, a_dtype, _vpmaddubsw(
        8, "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"))),
}


def intrinsic_name(isa: str, a_dtype: str) -> str:
    lanes = _IMPLEMENTATIONS[isa][0]
    return f"quantvm_dot_{lanes}x{GROUP}_{'u8' if a_dtype == 'uint8' else 's8'}s8_{isa}"


for _isa, (_lanes, _impl) in _IMPLEMENTATIONS.items():
    for _a_dtype in ("uint8", "int8"):
        TensorIntrin.register(intrinsic_name(_isa, _a_dtype), _desc(_lanes, _a_dtype), _impl(_a_dtype),
                              override=True)


def int8_dot_intrinsic(spec: TargetSpec, lanes: int, a_dtype: str, bounded: bool = False) -> str | None:
    """The intrinsic for a `lanes` x 4 block of `a_dtype` activations on `spec`; None where the target has
    none (plain loops). Chosen from the target's features: a VNNI instruction on a CPU without it aborts
    LLVM's codegen. 8-lane blocks on AVX-512 targets are FCs whose width is not a multiple of 16. `bounded`:
    the weight is a constant whose pairs are within PAIR_BOUND (`pairs_are_bounded`)."""
    if spec.has("avx512_vnni"):
        return intrinsic_name("vnni" if lanes == 16 else "vnni256", a_dtype)
    suffix = "_bounded" if bounded else ""
    if lanes == 16 and spec.has("avx512bw"):
        return intrinsic_name("avx512bw" + suffix, a_dtype)
    if lanes == 8 and spec.has("avx2"):
        return intrinsic_name("avx2" + suffix, a_dtype)
    return None


def needs_bounded_pairs(spec: TargetSpec) -> bool:
    """Whether int8 on `spec` is faster with bounded weight pairs: a CPU without VNNI, whose `vpmaddubsw`
    could otherwise saturate."""
    return not spec.has("avx512_vnni") and spec.has("avx2")


def dot_reads_unsigned(spec: TargetSpec, bounded: bool = False) -> bool:
    """Whether `spec`'s int8 dot reads the data as u8 (VNNI's `vpdpbusd`; `vpmaddubsw` on a weight with
    bounded pairs), so that s8 data costs it a second dot per step (`_u8_dot_impl`). The exact `vpmaddwd`
    form reads s8 as cheaply as u8."""
    return spec.has("avx512_vnni") or (bounded and needs_bounded_pairs(spec))


def pairs_are_bounded(weight: np.ndarray) -> bool:
    """Whether a weight packed with its 4 input channels on the last axis (the intrinsics' [..., lanes, 4])
    has |w[2j]| + |w[2j+1]| <= PAIR_BOUND everywhere."""
    magnitude = np.abs(weight.astype(np.int32))
    return bool(np.all(magnitude[..., 0::2] + magnitude[..., 1::2] <= PAIR_BOUND))
