"""The C API (quantvm.h, libquantvm.so) and the quantvm-run runner: their sources ship in this package and are
built here with the system C++ compiler against the TVM runtime of the installed wheels.

Nothing here imports TVM: the wheels' folders are found with importlib.util.find_spec, which runs no code.

`python -m compiler.capi --cflags --libs` (or `quantvm capi-flags`) prints the flags to build a program
against the C API; libquantvm.so is built on first use into a cache folder ($QUANTVM_CACHE_DIR, else
~/.cache/quantvm/capi), one per source, compiler and runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compiler.errors import QuantvmError

SOURCE_DIR = Path(__file__).resolve().parent
HEADER = SOURCE_DIR / "quantvm.h"
LIBRARY_SOURCE = SOURCE_DIR / "quantvm.cc"
RUNNER_SOURCE = SOURCE_DIR / "quantvm_run.cc"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")  # what libquantvm.so needs (readelf -d); artifacts need libc only
CXXFLAGS = ("-std=c++17", "-O2")


@dataclass(frozen=True)
class Runtime:
    """The installed wheels' TVM runtime: headers and the two shared libraries."""

    ffi_include: Path
    libs: dict  # file name -> path

    @property
    def lib_dirs(self) -> list[Path]:
        return sorted({path.parent for path in self.libs.values()})


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_runtime() -> Runtime:
    """The TVM runtime libraries and tvm-ffi headers of the installed apache-tvm and apache-tvm-ffi wheels."""
    tvm_dir, ffi_dir = _package_dir("tvm"), _package_dir("tvm_ffi")
    if tvm_dir is None or ffi_dir is None:
        raise QuantvmError("the C API needs the apache-tvm and apache-tvm-ffi wheels installed (pip install quantvm)")
    libs = {"libtvm_runtime.so": tvm_dir / "lib" / "libtvm_runtime.so", "libtvm_ffi.so": ffi_dir / "lib" / "libtvm_ffi.so"}
    include = ffi_dir / "include"
    for path in [*libs.values(), include / "tvm" / "ffi" / "function.h"]:
        if not path.is_file():
            raise QuantvmError(f"the installed TVM wheels lack {path}: reinstall apache-tvm and apache-tvm-ffi")
    return Runtime(include, libs)


def find_compiler() -> list[str]:
    """The system C++ compiler: $CXX if set, else c++, else g++, else clang++."""
    env = os.environ.get("CXX", "").strip()
    if env:
        command = shlex.split(env)
        if shutil.which(command[0]) is None:
            raise QuantvmError(f"$CXX is {env!r}, but {command[0]} is not an executable on PATH: set CXX to a C++ "
                               "compiler (g++ or clang++)")
        return command
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [name]
    raise QuantvmError("no C++ compiler found (looked for $CXX, c++, g++, clang++): install one, e.g. "
                       "apt-get install g++, or set CXX")


def _compile(command: list[str], what: str) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as err:
        raise QuantvmError(f"cannot build {what}: running {command[0]} failed: {err.strerror or err}") from err
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()] or result.stderr.splitlines()
        raise QuantvmError(f"building {what} failed ({shlex.join(command[:2])} ...): "
                           f"{' | '.join(errors[:3]) or f'exit status {result.returncode}'}")


def build_library(out: Path, rpaths: list[str], runtime: Runtime | None = None,
                  compiler: list[str] | None = None) -> Path:
    """Compile libquantvm.so to `out`, with RUNPATH `rpaths` (e.g. ["$ORIGIN"]) to find the runtime."""
    runtime = runtime or find_runtime()
    compiler = compiler or find_compiler()
    command = [*compiler, *CXXFLAGS, "-fPIC", "-shared", "-fvisibility=hidden", str(LIBRARY_SOURCE),
               f"-I{runtime.ffi_include}", *(f"-L{d}" for d in runtime.lib_dirs),
               # nothing of libtvm_runtime.so is called by name: it registers the Relax VM's loader when it loads
               "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed",
               *(f"-Wl,-rpath,{r}" for r in rpaths), "-o", str(out)]
    _compile(command, "libquantvm.so")
    return out


def build_runner(out: Path, library_dir: Path, rpaths: list[str], runtime: Runtime | None = None,
                 compiler: list[str] | None = None) -> Path:
    """Compile quantvm-run to `out`, linked with the libquantvm.so in `library_dir`."""
    runtime = runtime or find_runtime()
    compiler = compiler or find_compiler()
    command = [*compiler, *CXXFLAGS, str(RUNNER_SOURCE), f"-I{SOURCE_DIR}", f"-L{library_dir}", "-lquantvm",
               *(f"-Wl,-rpath-link,{d}" for d in [library_dir, *runtime.lib_dirs]),
               *(f"-Wl,-rpath,{r}" for r in rpaths), "-o", str(out)]
    _compile(command, "quantvm-run")
    return out


def cache_dir() -> Path:
    env = os.environ.get("QUANTVM_CACHE_DIR", "").strip()
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "quantvm" / "capi"


def installed_library() -> Path:
    """libquantvm.so for programs built against the installed wheels (RUNPATH: their lib folders), built on
    first use into the cache and reused while its source, the compiler and the runtime stay the same."""
    runtime = find_runtime()
    compiler = find_compiler()
    key = hashlib.sha256()
    for path in (HEADER, LIBRARY_SOURCE):
        key.update(path.read_bytes())
    for path in runtime.libs.values():
        key.update(f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    key.update(shlex.join(compiler).encode())
    folder = cache_dir() / key.hexdigest()[:16]
    library = folder / "libquantvm.so"
    if library.is_file():
        return folder
    work = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        build_library(work / "libquantvm.so", [str(d) for d in runtime.lib_dirs], runtime, compiler)
        shutil.copy2(HEADER, work / "quantvm.h")
        with contextlib.suppress(OSError):  # complete, then under its name (another process may have won the race)
            work.rename(folder)
    except OSError as err:
        raise QuantvmError(f"cannot build libquantvm.so into {folder}: {err.strerror or err}") from err
    finally:
        if work is not None and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return folder


def cflags() -> list[str]:
    """Compiler flags: the folder of quantvm.h."""
    return [f"-I{SOURCE_DIR}"]


def libs() -> list[str]:
    """Linker flags: libquantvm.so (built on first use) and the runtime it needs, with their RUNPATHs."""
    runtime = find_runtime()
    folder = installed_library()
    dirs = [folder, *runtime.lib_dirs]
    return [f"-L{folder}", "-lquantvm", *(f"-Wl,-rpath,{d}" for d in dirs),
            *(f"-Wl,-rpath-link,{d}" for d in runtime.lib_dirs)]
