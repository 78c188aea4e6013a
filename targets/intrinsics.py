"""u8 x s8 -> s32 dot-product tensor intrinsics: C[lane] += sum_k A[k] * B[lane, k], k < 4.

- VNNI (cascadelake, icelake-server, sapphirerapids): one `vpdpbusd`. TVM 0.27's stock `dot_16x4_vnni`
  passes <16 x i32> operands that LLVM 22 rejects; this one passes the <64 x i8> operands it expects.
- AVX-512BW (skylake-avx512) and AVX2 (this host): exact. `vpmaddubsw` would saturate its int16 pair sums
  (255*127*2 > 32767), so bytes are split into even and odd halves, widened to int16 in registers, and
  multiplied with `vpmaddwd`, whose int32 pair sums cannot overflow.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from targets.registry import TargetSpec

GROUP = 4  # input channels per 32-bit lane
FLIP_BYTES = -2139062144  # 0x80808080 as int32: xor flips s8 to u8 + 128


def _desc(lanes: int, a_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((GROUP,), a_dtype, offset_factor=1),
             b: T.Buffer((lanes, GROUP), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:GROUP], b[0:lanes, 0:GROUP])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, GROUP):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    return desc


def _vnni_impl(lanes: int, a_dtype: str):
    """u8: one vpdpbusd. s8: vpdpbusd reads u8, so a+128 (a xor 0x80) goes in and 128*b comes off again
    (a second vpdpbusd); int32 wraparound makes the difference exact. 16 lanes: zmm; 8: ymm (AVX512VL)."""
    signed = a_dtype == "int8"
    i32, u8, i8 = f"int32x{lanes}", f"uint8x{4 * lanes}", f"int8x{4 * lanes}"
    vpdpbusd = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((GROUP,), a_dtype, offset_factor=1),
             b: T.Buffer((lanes, GROUP), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:GROUP], b[0:lanes, 0:GROUP])
            T.writes(c[0:lanes])
            b_bytes = b.vload([0, 0], dtype=i8)
            if signed:
                # the flip on the scalar, before the broadcast: LLVM 22 hangs compiling the vector form
                # for icelake-server and sapphirerapids
                a_word = T.reinterpret(a.vload([0], "int8x4"), dtype="int32") ^ T.int32(FLIP_BYTES)
                shifted = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(vpdpbusd), c.vload([0], dtype=i32),
                    T.reinterpret(T.broadcast(a_word, lanes), dtype=u8), b_bytes, dtype=i32)
                c[T.ramp(T.int32(0), 1, lanes)] = shifted - T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(vpdpbusd), T.broadcast(T.int32(0), lanes),
                    T.reinterpret(T.broadcast(T.int32(FLIP_BYTES), lanes), dtype=u8), b_bytes, dtype=i32)
            else:
                a_word = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
                c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(vpdpbusd), c.vload([0], dtype=i32),
                    T.reinterpret(T.broadcast(a_word, lanes), dtype=u8), b_bytes, dtype=i32)

    return impl


def _exact_impl(lanes: int, madd: str, a_dtype: str):
    """Even and odd bytes as int16 pairs, two `vpmaddwd`s: exact for the full u8 and s8 ranges.
    A's bytes are zero-extended (u8) or sign-extended (s8)."""
    halves = 2 * lanes
    signed = a_dtype == "int8"
    i32 = f"int32x{lanes}"
    i16 = f"int16x{halves}"

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((GROUP,), a_dtype, offset_factor=1),
             b: T.Buffer((lanes, GROUP), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:GROUP], b[0:lanes, 0:GROUP])
            T.writes(c[0:lanes])
            eight = T.broadcast(T.int16(8), halves)
            a_pairs = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], f"{a_dtype}x4"), dtype="int32"), lanes),
                                    dtype=i16)
            low_byte = T.broadcast(T.int16(0xFF), halves)
            a_even = ((a_pairs << eight) >> eight) if signed else (a_pairs & low_byte)
            a_odd = (a_pairs >> eight) if signed else ((a_pairs >> eight) & low_byte)
            b_pairs = T.reinterpret(b.vload([0, 0], dtype=f"int8x{4 * lanes}"), dtype=i16)
            b_even = (b_pairs << eight) >> eight
            b_odd = b_pairs >> eight
            c[T.ramp(T.int32(0), 1, lanes)] = (
                c.vload([0], dtype=i32)
                + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(madd), a_even, b_even, dtype=i32)
                + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(madd), a_odd, b_odd, dtype=i32))

    return impl


_IMPLEMENTATIONS = {  # isa: (lanes, implementation for an activation dtype)
    "vnni": (16, lambda a_dtype: _vnni_impl(16, a_dtype)),
    "vnni256": (8, lambda a_dtype: _vnni_impl(8, a_dtype)),
    "avx512bw": (16, lambda a_dtype: _exact_impl(16, "llvm.x86.avx512.pmaddw.d.512", a_dtype)),
    "avx2": (8, lambda a_dtype: _exact_impl(8, "llvm.x86.avx2.pmadd.wd", a_dtype)),
}


def intrinsic_name(isa: str, a_dtype: str) -> str:
    lanes = _IMPLEMENTATIONS[isa][0]
    return f"quantvm_dot_{lanes}x{GROUP}_{'u8' if a_dtype == 'uint8' else 's8'}s8_{isa}"


for _isa, (_lanes, _impl) in _IMPLEMENTATIONS.items():
    for _a_dtype in ("uint8", "int8"):
        TensorIntrin.register(intrinsic_name(_isa, _a_dtype), _desc(_lanes, _a_dtype), _impl(_a_dtype),
                              override=True)


def int8_dot_intrinsic(spec: TargetSpec, lanes: int, a_dtype: str) -> str | None:
    """The intrinsic for a `lanes` x 4 block of `a_dtype` activations on `spec`; None where the target has
    none (plain loops). Chosen from the target's features: a VNNI instruction on a CPU without it aborts
    LLVM's codegen. 8-lane blocks on AVX-512 targets are FCs whose width is not a multiple of 16."""
    if spec.has("avx512_vnni"):
        return intrinsic_name("vnni" if lanes == 16 else "vnni256", a_dtype)
    if lanes == 16 and spec.has("avx512bw"):
        return intrinsic_name("avx512bw", a_dtype)
    if lanes == 8 and spec.has("avx2"):
        return intrinsic_name("avx2", a_dtype)
    return None
