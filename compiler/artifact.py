"""The `.so` artifact: metadata embedded in an ELF section, read back without loading any model code,
and an export that writes to a temporary file and renames it into place only when it is complete."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from compiler.atomic import atomic_path
from compiler.errors import ArtifactError
from compiler.quiet import tvm_scope_warnings_silenced

FORMAT = "quantvm-artifact"
FORMAT_VERSION = 1
SECTION = ".quantvm_meta"


def metadata_addon_source(metadata: dict) -> str:
    """C source that places the metadata JSON in its own read-only ELF section of the shared library."""
    payload = json.dumps(metadata, sort_keys=True).encode() + b"\0"
    body = ",".join(str(b) for b in payload)
    return (f'__attribute__((section("{SECTION}"), used, aligned(1)))\n'
            f"const unsigned char quantvm_metadata[{len(payload)}] = {{{body}}};\n")


def export_executable(executable, metadata: dict, path) -> Path:
    """Write `executable` and its metadata as one shared library at `path`, atomically."""
    path = Path(path)
    # The temporary name ends in .so: export_library picks the output format from the suffix.
    with atomic_path(path, suffix=".tmp.so") as tmp, tempfile.TemporaryDirectory(prefix="quantvm-") as work:
        addon = Path(work) / "quantvm_metadata.c"
        addon.write_text(metadata_addon_source(metadata))
        try:
            with tvm_scope_warnings_silenced():
                executable.export_library(str(tmp), addons=[str(addon)], workspace_dir=work)
        except Exception as err:  # compiler or linker failure: report it, keep nothing
            lines = str(err).strip().splitlines()
            raise ArtifactError(f"cannot export to {path}: building the shared library failed: "
                                f"{lines[-1] if lines else repr(err)}") from err
    return path


def read_metadata(path) -> dict:
    """The metadata of a quantvm artifact, read from its ELF section; runs none of its code."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        with path.open("rb") as f:
            elf = ELFFile(f)
            section = elf.get_section_by_name(SECTION)
            raw = section.data() if section is not None else None
    except (ELFError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} is not a quantvm artifact (not an ELF shared library: {err})") from err
    if raw is None:
        raise ArtifactError(f"{path} is not a quantvm artifact (it has no {SECTION} section)")
    try:
        metadata = json.loads(raw.rstrip(b"\0").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: its quantvm metadata is corrupted ({err})") from err
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a quantvm artifact (metadata format {metadata.get('format')!r})")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path} uses artifact format {metadata['format_version']}, newer than this "
                            f"quantvm reads ({FORMAT_VERSION}); upgrade quantvm")
    return metadata
