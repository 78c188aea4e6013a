"""Named compilation targets and the CPU features the code built for each one needs.

A target is an LLVM CPU name. The features its code may use are asked of LLVM itself (the same table the
code generator uses), then reduced to the instruction-set extensions a kernel can emit, spelled as Linux
spells them in /proc/cpuinfo, so an artifact's requirements can be checked against any host's flags.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import tvm
from tvm.target import codegen

from targets.host import missing_features
from quantvm.errors import TargetError

TRIPLE = "x86_64-linux-gnu"

# name -> (LLVM CPU, what it is for)
NAMED_TARGETS = {
    "cascadelake": ("cascadelake", "Intel Xeon 2nd gen (Cascade Lake): AVX-512 + VNNI"),
    "skylake-avx512": ("skylake-avx512", "Intel Xeon 1st gen (Skylake-SP): AVX-512, no VNNI"),
    "icelake-server": ("icelake-server", "Intel Xeon 3rd gen (Ice Lake-SP): AVX-512 + VNNI"),
    "sapphirerapids": ("sapphirerapids", "Intel Xeon 4th gen (Sapphire Rapids): AVX-512 + VNNI + AMX"),
    "avx2": ("x86-64-v3", "any x86-64 with AVX2 and FMA (x86-64-v3)"),
    "znver3": ("znver3", "AMD EPYC 3rd gen (Zen 3): AVX2"),
    "native": (None, "this host's CPU, as LLVM detects it"),
}

# LLVM feature name -> /proc/cpuinfo flag, for every extension generated code may contain.
LLVM_TO_CPUINFO = {
    "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "movbe": "movbe", "adx": "adx", "aes": "aes", "pclmul": "pclmulqdq", "sha": "sha_ni",
    "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "gfni": "gfni", "avxvnni": "avx_vnni",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512ifma": "avx512ifma", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
    # AMD-only: LLVM lowers some shuffles to SSE4A's extrq/insertq on Zen, which Intel CPUs lack
    "sse4a": "sse4a", "xop": "xop", "fma4": "fma4", "tbm": "tbm",
}


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: its name, the LLVM CPU, and what its code needs from the CPU."""

    name: str
    mcpu: str
    mattr: tuple[str, ...] = ()
    num_cores: int | None = None
    required_features: tuple[str, ...] = field(default=())

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(self.tvm_dict())

    def tvm_dict(self) -> dict:
        spec = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": self.mcpu}
        if self.mattr:
            spec["mattr"] = list(self.mattr)
        if self.num_cores:
            spec["num-cores"] = self.num_cores
        return spec

    def has(self, *cpuinfo_flags: str) -> bool:
        return all(flag in self.required_features for flag in cpuinfo_flags)


def required_features(mcpu: str, mattr=()) -> tuple[str, ...]:
    """The /proc/cpuinfo flags code built for `mcpu` (plus `mattr`) may rely on, sorted."""
    spec = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": mcpu}
    if mattr:
        spec["mattr"] = list(mattr)
    llvm_features = codegen.llvm_get_cpu_features(tvm.target.Target(spec))
    return tuple(sorted({LLVM_TO_CPUINFO[f] for f in llvm_features if f in LLVM_TO_CPUINFO}))


def host_cpu() -> str:
    """The LLVM name of this host's CPU (e.g. 'znver3'); 'mcpu: native' in TVM silently builds generic code."""
    return str(codegen.llvm_get_system_cpu())




def resolve_target(target: str | TargetSpec) -> TargetSpec:
    """Turn a registry name (`cascadelake`, `native`, ...) or a classic `llvm -mcpu=...` string into a spec."""
    if isinstance(target, TargetSpec):
        return target
    if not isinstance(target, str) or not target.strip():
        raise TargetError(f"target must be a name such as 'cascadelake' or 'llvm -mcpu=...', got {target!r}")
    text = target.strip()
    if text.split()[0] == "llvm":
        return _parse_llvm_string(text)
    if text not in NAMED_TARGETS:
        raise TargetError(f"unknown target {text!r}; known targets: {', '.join(NAMED_TARGETS)} "
                          "(or a classic string such as 'llvm -mcpu=cascadelake')")
    if text == "native":
        return native_target()
    mcpu = NAMED_TARGETS[text][0]
    return TargetSpec(name=text, mcpu=mcpu, required_features=required_features(mcpu))


def native_target(name="native") -> TargetSpec:
    """This host's CPU, minus any extension the CPU model has but the host hides (as hypervisors do)."""
    mcpu = host_cpu()
    hidden = missing_features(required_features(mcpu))
    cpuinfo_to_llvm = {flag: llvm for llvm, flag in LLVM_TO_CPUINFO.items()}
    mattr = tuple(f"-{cpuinfo_to_llvm[flag]}" for flag in hidden)
    return TargetSpec(name=name, mcpu=mcpu, mattr=mattr, required_features=required_features(mcpu, mattr))


def _parse_llvm_string(text: str) -> TargetSpec:
    """Accept the pre-0.20 TVM spelling, e.g. `llvm -mcpu=cascadelake -num-cores=4 -mattr=+avx512f`."""
    options = {}
    for word in shlex.split(text)[1:]:
        key, sep, value = word.lstrip("-").partition("=")
        if not sep or key not in ("mcpu", "mattr", "num-cores", "mtriple"):
            raise TargetError(f"target {text!r}: cannot use {word!r}; supported options are "
                              "-mcpu=CPU, -mattr=+feat,..., -num-cores=N")
        options[key] = value
    if options.get("mtriple", TRIPLE).split("-")[0] != "x86_64":
        raise TargetError(f"target {text!r}: only x86_64 targets are supported")
    mcpu = options.get("mcpu", "x86-64")
    if mcpu == "native" and "mattr" not in options:
        return native_target()
    if mcpu == "native":
        mcpu = host_cpu()
    if not codegen.llvm_is_valid_cpu(mcpu, TRIPLE):
        raise TargetError(f"target {text!r}: LLVM does not know the CPU {mcpu!r}")
    mattr = tuple(a for a in options.get("mattr", "").split(",") if a)
    try:
        cores = int(options["num-cores"]) if "num-cores" in options else None
    except ValueError:
        raise TargetError(f"target {text!r}: -num-cores must be a whole number") from None
    name = next((n for n, (cpu, _) in NAMED_TARGETS.items() if cpu == mcpu and not mattr), mcpu)
    return TargetSpec(name=name, mcpu=mcpu, mattr=mattr, num_cores=cores,
                      required_features=required_features(mcpu, mattr))
