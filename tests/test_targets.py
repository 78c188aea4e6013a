import pytest

from compiler.errors import TargetError
from targets import NAMED_TARGETS, host_flags, missing_features, resolve_target

VNNI = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


@pytest.mark.parametrize("name", sorted(NAMED_TARGETS))
def test_every_named_target_resolves_to_an_llvm_cpu_with_features(name):
    spec = resolve_target(name)
    assert spec.name == name
    assert spec.tvm_target().attrs["mcpu"] == spec.mcpu
    assert {"avx", "avx2", "fma"} <= set(spec.required_features)


@pytest.mark.parametrize("name", ["cascadelake", "icelake-server", "sapphirerapids"])
def test_vnni_targets_need_avx512_vnni(name):
    assert VNNI <= set(resolve_target(name).required_features)


def test_skylake_has_avx512_without_vnni_and_avx2_has_neither():
    assert "avx512bw" in resolve_target("skylake-avx512").required_features
    assert "avx512_vnni" not in resolve_target("skylake-avx512").required_features
    assert not any(f.startswith("avx512") for f in resolve_target("avx2").required_features)
    assert {"amx_int8", "amx_tile"} <= set(resolve_target("sapphirerapids").required_features)


def test_zen_targets_need_the_amd_only_extensions_llvm_may_emit():
    # LLVM lowers some shuffles to SSE4A's extrq/insertq for Zen: such code is an illegal instruction on Intel
    assert "sse4a" in resolve_target("znver3").required_features
    assert "sse4a" not in resolve_target("avx2").required_features


def test_classic_llvm_string_is_accepted():
    spec = resolve_target("llvm -mcpu=cascadelake -num-cores=4")
    assert spec.name == "cascadelake" and spec.num_cores == 4
    assert spec.required_features == resolve_target("cascadelake").required_features
    assert spec.tvm_dict()["num-cores"] == 4


def test_classic_string_with_mattr_adds_its_features():
    spec = resolve_target("llvm -mcpu=haswell -mattr=+avx512f,+avx512bw")
    assert spec.mcpu == "haswell" and {"avx512f", "avx512bw"} <= set(spec.required_features)


def test_native_is_this_host_and_runs_here():
    spec = resolve_target("native")
    assert spec.name == "native"
    assert missing_features(spec.required_features) == []
    assert resolve_target("llvm -mcpu=native").required_features == spec.required_features


@pytest.mark.parametrize("bad, words", [
    ("cascadelak", "unknown target"),
    ("llvm -mcpu=notacpu", "does not know the CPU"),
    ("llvm -mcpu=cascadelake -opt-level=3", "cannot use"),
    ("llvm -mtriple=aarch64-linux-gnu", "only x86_64"),
    ("llvm -num-cores=four", "whole number"),
    ("", "target must be"),
])
def test_bad_targets_get_a_clear_error(bad, words):
    with pytest.raises(TargetError, match=words):
        resolve_target(bad)


def test_host_flags_come_from_cpuinfo():
    assert "sse2" in host_flags()
