"""The `.so` artifact: metadata embedded in an ELF section, read back without loading any model code,
and an export that writes to a temporary file and renames it into place only when it is complete.

Integrity: the metadata records the SHA-256 of the whole file, taken while the 64 hex characters of the
digest itself still read as a placeholder of "0"s. So every byte is covered (ELF headers, code, weights,
symbol tables, and the metadata: target, required CPU features, ...) except those 64 characters, and
`read_metadata` refuses a file whose bytes do not hash to the digest it records. This catches damage
(truncation, a bad copy, a flipped bit, an edit) but not a forgery: whoever can rewrite the file can also
recompute the digest.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from elftools.elf.elffile import ELFFile

from compiler.atomic import atomic_path
from compiler.errors import ArtifactError
from compiler.metadata import DIGEST_KEY, FORMAT, FORMAT_VERSION, ArtifactMetadata
from quantvm.quiet import tvm_noise_silenced

SECTION = ".quantvm_meta"
_PLACEHOLDER = b"0" * 64  # what the digest's own bytes read as while hashing, at export and at verification
_SLOT = f'"{DIGEST_KEY}": "'.encode()  # json.dumps spells the key so; the digest's 64 characters follow
_CHUNK = 1 << 20


def metadata_addon_source(metadata: ArtifactMetadata) -> str:
    """C source that places the metadata JSON in its own read-only ELF section of the shared library."""
    payload = json.dumps(metadata.to_json(), sort_keys=True).encode() + b"\0"
    body = ",".join(str(b) for b in payload)
    return (f'__attribute__((section("{SECTION}"), used, aligned(1)))\n'
            f"const unsigned char quantvm_metadata[{len(payload)}] = {{{body}}};\n")


def export_executable(executable, metadata: ArtifactMetadata, path) -> Path:
    """Write `executable` and its metadata as one shared library at `path`, atomically, digest included."""
    path = Path(path)
    # The temporary name ends in .so: export_library picks the output format from the suffix.
    with atomic_path(path, suffix=".tmp.so") as tmp, tempfile.TemporaryDirectory(prefix="quantvm-") as work:
        addon = Path(work) / "quantvm_metadata.c"
        addon.write_text(metadata_addon_source(metadata.with_digest(_PLACEHOLDER.decode())))
        try:
            with tvm_noise_silenced():
                executable.export_library(str(tmp), addons=[str(addon)], workspace_dir=work)
        except Exception as err:  # compiler or linker failure: report it, keep nothing
            raise ArtifactError(f"cannot export to {path}: building the shared library failed: "
                                f"{_first_error_line(err)}") from err
        with tmp.open("r+b") as f:  # hash with the placeholder in place, then write the digest over it
            slot = _digest_slot(*_read_section(f, path), path)
            digest = _sha256_with_placeholder(f, slot)
            f.seek(slot)
            f.write(digest.encode())
    return path


def _first_error_line(err: Exception) -> str:
    """The cause in TVM's compiler error (e.g. "ld: final link failed: No space left on device"), not the
    header or the command line it wraps around it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if line != "Compilation error:" and not line.startswith("Command line:")]
    return (causes or lines or [repr(err)])[0]


def read_metadata(path) -> ArtifactMetadata:
    """The metadata of a quantvm artifact, read from its ELF section once the file's digest checks out;
    reads the whole file (streamed) and runs none of its code."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        with path.open("rb") as f:
            raw, offset = _read_section(f, path)
            metadata = _parse_metadata(raw, path)
            actual = _sha256_with_placeholder(f, _digest_slot(raw, offset, path))
    except OSError as err:
        raise ArtifactError(f"cannot read {path}: {err.strerror or err}") from err
    if actual != metadata[DIGEST_KEY]:
        raise ArtifactError(f"{path} is damaged or was modified after export: its SHA-256 is {actual[:16]}..., "
                            f"its metadata records {str(metadata[DIGEST_KEY])[:16]}...; re-export it")
    try:
        return ArtifactMetadata.from_json(metadata)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ArtifactError(f"{path}: its quantvm metadata is corrupted (missing or malformed {err})") from err


def _read_section(f, path: Path) -> tuple[bytes, int]:
    """The bytes of the metadata section in the open file `f`, and their offset in the file."""
    try:
        elf = ELFFile(f)
        section = elf.get_section_by_name(SECTION)
        if section is not None and section["sh_offset"] + section["sh_size"] > elf.stream_len:
            raise ArtifactError(f"{path} is truncated or damaged: its {SECTION} section ends past the end of "
                                "the file")
        raw = section.data() if section is not None else None
    except (ArtifactError, OSError):
        raise
    except Exception as err:  # pyelftools on damaged bytes raises many kinds; all mean the same to us
        raise ArtifactError(f"{path} is not a quantvm artifact: not an ELF shared library, or a damaged one "
                            f"({err or type(err).__name__})") from err
    if raw is None:
        raise ArtifactError(f"{path} is not a quantvm artifact (it has no {SECTION} section: not exported by "
                            "quantvm, or damaged)")
    return raw, section["sh_offset"]


def _parse_metadata(raw: bytes, path: Path) -> dict:
    try:
        metadata = json.loads(raw.rstrip(b"\0").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: its quantvm metadata is corrupted ({err})") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a quantvm artifact (metadata format "
                            f"{metadata.get('format') if isinstance(metadata, dict) else None!r})")
    version = metadata.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path} uses artifact format {version}, newer than this quantvm reads "
                            f"({FORMAT_VERSION}); upgrade quantvm")
    if DIGEST_KEY not in metadata:
        raise ArtifactError(f"{path} has no integrity digest (artifact format {version}, from an older quantvm): "
                            "re-export it from the model with this quantvm")
    return metadata


def _digest_slot(raw: bytes, offset: int, path: Path) -> int:
    """The file offset of the digest's 64 characters, given the metadata section's bytes and offset."""
    if raw.count(_SLOT) != 1:
        raise ArtifactError(f"{path}: its quantvm metadata is corrupted (no single {DIGEST_KEY} entry)")
    return offset + raw.index(_SLOT) + len(_SLOT)


def _sha256_with_placeholder(f, slot: int) -> str:
    """SHA-256 of the whole open file, streamed, with the 64 bytes at `slot` read as the placeholder."""
    sha = hashlib.sha256()
    f.seek(0)
    remaining = slot
    while remaining > 0 and (chunk := f.read(min(_CHUNK, remaining))):
        sha.update(chunk)
        remaining -= len(chunk)
    sha.update(_PLACEHOLDER)
    f.seek(slot + len(_PLACEHOLDER))
    while chunk := f.read(_CHUNK):
        sha.update(chunk)
    return sha.hexdigest()
