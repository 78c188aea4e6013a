"""`quantvm bundle`: one folder that runs an artifact without Python: the artifact, the TVM runtime copied from
the installed wheels, quantvm.h, libquantvm.so and the quantvm-run runner built here, and a README.

The folder is written under a temporary name beside its destination and renamed when complete: a failure
leaves nothing, and an existing folder is replaced (--force) only once the new one is whole.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from compiler.artifact import read_metadata
from compiler.atomic import atomic_folder
from compiler.capi import (
    HEADER,
    build_library,
    build_runner,
    find_compiler,
    find_runtime,
)
from compiler.errors import ArtifactError
from compiler.metadata import ArtifactMetadata

README = """# {name}: a quantvm model, deployable without Python

| file | what |
|---|---|
| `{artifact}` | the compiled model ({source}, {precision}) for target `{target}` (mcpu {mcpu}) |
| `quantvm-run` | runs it on .npy files |
| `quantvm.h`, `libquantvm.so` | the C API, to run it from your own C or C++ program |
| `libtvm_runtime.so`, `libtvm_ffi.so` | the TVM runtime (Apache-2.0) they load |

Inputs: {inputs}
Outputs: {outputs}

The executables and libraries find each other through RUNPATH `$ORIGIN`: keep the files together (the
artifact may be anywhere). They need a 64-bit x86 Linux with glibc and libstdc++, and a CPU with: {features}.
A host without them is refused with a message naming what it lacks.

**Only load artifacts you trust**: loading one runs its code, as loading any shared library does. libquantvm
checks the file's SHA-256 against the digest its metadata records (damage, not forgery) and the CPU features
before any of its code is loaded.

## Run on .npy files

    ./quantvm-run {artifact} {input_args} --output-dir out
    ./quantvm-run {artifact} {input_args} --repeat 100   # one JSON line: median_ms, min_ms, times_ms

Inputs must be C-order, little-endian .npy files of the shapes and dtypes above; `out/<output name>.npy` is
written per output. `--threads N` sets the threads per run (default: $TVM_NUM_THREADS, else {threads}).

## From C or C++

    #include "quantvm.h"
    quantvm_model* m = quantvm_load("{artifact}", 0);       /* NULL on failure: quantvm_last_error() */
    quantvm_tensor_info in, out;
    quantvm_input_info(m, 0, &in);  quantvm_output_info(m, 0, &out);
    /* ... fill an input buffer of in.num_bytes, allocate out.num_bytes ... */
    quantvm_run(m, inputs, input_bytes, outputs, output_bytes);  /* 0, or < 0 and quantvm_last_error() */
    quantvm_free(m);

Build: `cc main.c -I. -L. -lquantvm -Wl,-rpath,'$ORIGIN' -o main` (or `c++` for C++) in this folder.
"""


@dataclass(frozen=True)
class Bundle:
    """A written deployment folder: its files and their sizes, and what the TVM runtime takes of it."""

    folder: Path
    files: dict  # file name -> bytes
    runtime_files: tuple[str, ...]
    artifact: str  # the artifact's file name
    compiler: str  # the C++ compiler command that built the C API and the runner

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def runtime_bytes(self) -> int:
        return sum(self.files[name] for name in self.runtime_files)

    @property
    def artifact_bytes(self) -> int:
        return self.files[self.artifact]


def bundle(artifact, out_dir, force: bool = False) -> Bundle:
    """Write the deployment folder `out_dir` for `artifact`; returns what was written and the sizes."""
    artifact, out_dir = Path(artifact), Path(out_dir)
    meta = read_metadata(artifact)  # refuses a missing, damaged or foreign file before anything is written
    if artifact.resolve().is_relative_to(out_dir.resolve()):
        raise ArtifactError(f"cannot bundle into {out_dir}: it holds the artifact {artifact} itself; choose another "
                            "folder")
    runtime = find_runtime()
    compiler = find_compiler()
    with atomic_folder(out_dir, replace=force) as tmp:
        shutil.copy2(artifact, tmp / artifact.name)
        for name, path in runtime.libs.items():
            shutil.copy2(path, tmp / name)
        shutil.copy2(HEADER, tmp / "quantvm.h")
        build_library(tmp / "libquantvm.so", ["$ORIGIN"], runtime, compiler)
        build_runner(tmp / "quantvm-run", tmp, ["$ORIGIN"], runtime, compiler)
        (tmp / "README.md").write_text(readme(artifact.name, meta))
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    return Bundle(out_dir, sizes, tuple(runtime.libs), artifact.name, " ".join(compiler))


def readme(artifact_name: str, meta: ArtifactMetadata) -> str:
    def specs(tensors):
        return ", ".join(f"`{s.name}` {list(s.shape)} {s.dtype}" for s in tensors)

    inputs, target = meta.inputs, meta.target
    input_args = (f"--input {inputs[0].name}=INPUT.npy" if len(inputs) == 1 else
                  " ".join(f"--input {s.name}={s.name}.npy" for s in inputs))
    return README.format(name=Path(artifact_name).stem, artifact=artifact_name, source=meta.model.source,
                         precision=meta.precision, target=target.name, mcpu=target.mcpu,
                         inputs=specs(inputs), outputs=specs(meta.outputs),
                         features=" ".join(target.required_features) or "(none beyond x86-64)",
                         input_args=input_args,
                         threads=f"the {target.num_threads} it was compiled for" if target.num_threads
                         else "all cores")


def format_bundle(result: Bundle) -> str:
    mib = 1 << 20
    lines = [f"wrote {result.folder}: {result.total_bytes / mib:.1f} MiB in {len(result.files)} files; "
             f"the TVM runtime (libtvm_runtime.so + libtvm_ffi.so) is {result.runtime_bytes / mib:.1f} MiB "
             f"({result.runtime_bytes / result.total_bytes:.0%}), the artifact {result.artifact_bytes / mib:.1f} MiB"]
    lines += [f"  {name:24}{size / 1024:10.0f} KiB" for name, size in result.files.items()]
    lines.append(f"run it: {result.folder}/quantvm-run {result.artifact} --input NAME=FILE.npy --output-dir OUT")
    return "\n".join(lines)
