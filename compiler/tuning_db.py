"""Tuning databases: a directory holding MetaSchedule's JSON database (workloads and tuning records) and
quantvm's manifest, which says the target and the models it was tuned for.

The JSON database at the top is what builds apply: per kernel, the schedule the last tuning run chose when
it timed the kernel's default and the search's finalists side by side (and the default, when beaten).
`search/` is another one with every candidate the searches measured: where a resumed search starts from.

Every file is written whole and renamed into place, and a new folder is made beside its path and renamed
onto it: killed at any moment (even SIGKILL), a run leaves a database that reads and resumes, with at
most temporary files (LEFTOVERS), which the next run removes.

MetaSchedule's records carry no check of their own: queried for one CPU, a database returns records tuned
for another. The manifest is that check, made before anything is applied.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from compiler.atomic import atomic_path, current_umask
from compiler.errors import TargetError, TuningError
from compiler.report import ScheduleSummary

MANIFEST = "quantvm_tuning.json"
FORMAT = "quantvm-tuning-db"
FORMAT_VERSION = 2  # 2: the selection at the top, the search's records in SEARCH
# MetaSchedule's JSONDatabase files in a work_dir
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
SEARCH = "search"
LEFTOVERS = ".*.tmp"  # the temporary files and folders of this module and of atomic_path


def target_entry(spec) -> dict:
    return {"name": spec.name, "mcpu": spec.mcpu, "mattr": list(spec.mattr), "num_threads": spec.num_cores}


def model_entry(imported, precision: str) -> dict:
    """What a build's kernels depend on: the model, its precision and its input shapes."""
    return {"source": imported.source, "sha256": imported.sha256, "precision": precision,
            "inputs": {spec.name: list(spec.shape) for spec in imported.inputs}}


def describe(entry: dict) -> str:
    shapes = ", ".join(f"{name} {shape}" for name, shape in entry["inputs"].items())
    return f"{entry['source']} ({entry['precision']}, {shapes})"


@dataclass
class TuningDB:
    path: Path
    manifest: dict

    def database(self):
        """MetaSchedule's database of this folder; entered (`with`), it is the one `apply_pass` reads."""
        from tvm.s_tir.meta_schedule.database import JSONDatabase

        return JSONDatabase(work_dir=str(self.path), allow_missing=False)

    def apply_pass(self, target):
        """The pass that swaps in the database's best schedule for each kernel it has (marking it scheduled,
        so the default scheduler leaves it alone). Run it inside `with self.database():`: without a current
        database the pass opens the folder itself, and says so on stderr from C++."""
        from tvm import relax

        with target:  # the pass reads its target from the context it is made in
            return relax.transform.MetaScheduleApplyDatabase(str(self.path))

    def has_model(self, entry: dict) -> bool:
        """Whether `entry` (model_entry) was tuned here; where it came from does not matter."""
        key = ("sha256", "precision", "inputs")
        return any(all(m.get(k) == entry[k] for k in key) for m in self.manifest["models"])

    def check_applied(self, imported, precision: str, schedules: ScheduleSummary) -> dict:
        """After a build: refuse a database none of whose kernels this model has when it was tuned for other
        models (or for this model at another precision); warn when it was tuned for others but some match."""
        tuned = schedules.tuned
        this = model_entry(imported, precision)
        if not self.has_model(this):
            tuned_for = "; ".join(describe(m) for m in self.manifest["models"]) or "no model yet"
            if not tuned:
                raise TuningError(f"tuning database {self.path} was tuned for {tuned_for}, not for "
                                  f"{describe(this)}: none of its kernels are in it; run `quantvm tune` on this "
                                  f"model (same precision and input shapes) with --db {self.path}")
            warnings.warn(f"tuning database {self.path} was tuned for {tuned_for}, not for {describe(this)}; "
                          f"applying the {len(tuned)} kernel(s) this build shares with it", stacklevel=3)
        return {"database": str(self.path), "tuned_kernels": sorted(tuned),
                "default_kernels": sorted(schedules.applied)}


def open_tuning_db(path, spec) -> TuningDB:
    """Open `path` for `spec`'s build; refuse a directory that is not a tuning database or was tuned for
    another CPU (the thread count may differ: schedules stay valid, with a warning)."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if manifest is None:
        raise TuningError(f"tuning database {folder}: not a quantvm tuning database (no {MANIFEST} in it; "
                          "`quantvm tune` writes one)")
    for name in (WORKLOADS, RECORDS):
        if not (folder / name).is_file():
            raise TuningError(f"tuning database {folder}: {name} is missing")
    tuned = manifest["target"]
    if (tuned["mcpu"], tuned["mattr"]) != (spec.mcpu, list(spec.mattr)):
        raise TargetError(f"tuning database {folder} was tuned for target {tuned['name']!r} (mcpu {tuned['mcpu']}"
                          f"{_mattr(tuned['mattr'])}), not for {spec.name!r} (mcpu {spec.mcpu}"
                          f"{_mattr(spec.mattr)}): compile for that target, or tune for this one in another folder")
    if tuned["num_threads"] != spec.num_cores:
        warnings.warn(f"tuning database {folder} was tuned for {tuned['num_threads']} thread(s); this build is "
                      f"for {spec.num_cores}: its schedules still apply, but may not be the fastest", stacklevel=3)
    return TuningDB(folder, manifest)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of `folder`, None when it has none; an error for one that is not ours or is damaged."""
    if folder.exists() and not folder.is_dir():
        raise TuningError(f"tuning database {folder}: it is a file, not a directory")
    path = folder / MANIFEST
    if not path.is_file():
        if not folder.is_dir():
            raise TuningError(f"tuning database {folder}: no such directory")
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TuningError(f"tuning database {folder}: cannot read {MANIFEST} ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TuningError(f"tuning database {folder}: {MANIFEST} is not a quantvm tuning manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TuningError(f"tuning database {folder}: manifest version {manifest.get('format_version')}, "
                          f"this quantvm reads version {FORMAT_VERSION}")
    return manifest


def tuning_manifest(folder: Path, spec) -> dict | None:
    """The manifest of the database `folder` that tuning for `spec` would add to; None for a folder to
    create. Refuses another CPU's database: one CPU's records must not land in another's."""
    if folder.exists() and not folder.is_dir():
        raise TuningError(f"tuning database {folder}: it is a file, not a directory")
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        if folder.is_dir() and any((folder / name).exists() for name in (WORKLOADS, RECORDS)):
            raise TuningError(f"tuning database {folder}: holds MetaSchedule records without a {MANIFEST}: "
                              "their target is unknown; use another folder")
        if folder.is_dir() and any(folder.iterdir()):
            raise TuningError(f"tuning database {folder}: the folder holds other files; a new database goes in a "
                              "new or empty folder")
        return None
    tuned = manifest["target"]
    if (tuned["mcpu"], tuned["mattr"], tuned["num_threads"]) != (spec.mcpu, list(spec.mattr), spec.num_cores):
        raise TargetError(f"tuning database {folder} holds tuning for target {tuned['name']!r} (mcpu "
                          f"{tuned['mcpu']}{_mattr(tuned['mattr'])}, {tuned['num_threads']} thread(s)), not "
                          f"{spec.name!r} (mcpu {spec.mcpu}{_mattr(spec.mattr)}, {spec.num_cores} thread(s)): "
                          "one folder per target")
    return manifest


def create_database(folder: Path, spec) -> dict:
    """A new tuning database at `folder` (missing or empty): the manifest and an empty selection, which
    builds can apply before any kernel is tuned (a model may have none to tune). Made beside it and renamed
    onto it: the folder appears complete or not at all."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "target": target_entry(spec), "models": []}
    folder.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        JSONDatabase(work_dir=str(new))  # creates its empty files
        write_manifest(new, manifest)
        new.chmod(0o777 & ~current_umask())  # mkdtemp's is 0o700
        os.rename(new, folder)  # onto a missing or empty folder only
    except OSError as err:
        raise TuningError(f"cannot create tuning database {folder}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return manifest


@contextlib.contextmanager
def tuning_run(folder: Path):
    """Hold `folder` for one tuning run: a second run on it at the same time is refused (both would
    replace its files), and what in it matches LEFTOVERS is a killed run's, so it is removed."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel however the process ends
        except BlockingIOError:
            raise TuningError(f"tuning database {folder} is being tuned by another run; wait for it to end, or "
                              "tune into another folder") from None
        remove_leftovers(folder)
        yield
    finally:
        os.close(fd)


def remove_leftovers(folder: Path) -> None:
    for path in [*folder.glob(LEFTOVERS), *(folder / SEARCH).glob(LEFTOVERS)]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def search_records(folder: Path):
    """The search's database, as (MetaSchedule database, save). MetaSchedule appends each measured
    candidate to its JSON files a line at a time: killed mid-line, a file ends in a torn line, and TVM then
    refuses the whole file ("Unexpected end of string"; an empty line even segfaults it). So it appends to
    copies in a scratch folder, and `save()` puts them into SEARCH by rename."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    searched = folder / SEARCH
    scratch = Path(tempfile.mkdtemp(prefix=".search.", suffix=".tmp", dir=folder))
    try:
        for name in (WORKLOADS, RECORDS):
            if (searched / name).is_file():
                shutil.copyfile(searched / name, scratch / name)
        database = JSONDatabase(work_dir=str(scratch))

        def save():
            searched.mkdir(exist_ok=True)
            _publish(scratch, searched)

        yield database, save
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _publish(scratch: Path, folder: Path) -> None:
    """Copy the JSON database in `scratch` onto the one in `folder`, each file by rename. Workloads keep
    their order and records point at them by position, so the workloads file goes first: cut short after
    it, the folder holds the new workloads beside the old records, which still point right."""
    for name in (WORKLOADS, RECORDS):
        with atomic_path(folder / name) as tmp:
            shutil.copyfile(scratch / name, tmp)


def write_selection(folder: Path, selection: dict) -> None:
    """Make `selection` (kernel module -> its records) the applied records of those kernels, keeping the
    other kernels' as they are (cut short, the folder still holds the previous selection: see _publish)."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase, Workload

    old = JSONDatabase(work_dir=str(folder))
    with tempfile.TemporaryDirectory(prefix=".selection.", suffix=".tmp", dir=folder) as scratch:
        new = JSONDatabase(work_dir=scratch)
        for line in (folder / WORKLOADS).read_text().splitlines():
            if line.strip():
                new.commit_workload(Workload.from_json(json.loads(line)).mod)
        replaced = [new.commit_workload(mod) for mod in selection]
        for record in old.get_all_tuning_records():
            workload = new.commit_workload(record.workload.mod)
            if not any(workload.same_as(r) for r in replaced):
                new.commit_tuning_record(_moved(record, workload))
        for mod, records in selection.items():
            workload = new.commit_workload(mod)
            for record in records:
                new.commit_tuning_record(_moved(record, workload))
        _publish(Path(scratch), folder)


def _moved(record, workload):
    from tvm.s_tir.meta_schedule.database import TuningRecord

    return TuningRecord(record.trace, workload, record.run_secs, record.target, record.args_info)


def add_model(folder: Path, manifest: dict, entry: dict) -> None:
    if not TuningDB(folder, manifest).has_model(entry):
        manifest["models"].append(entry)
        write_manifest(folder, manifest)


def write_manifest(folder: Path, manifest: dict) -> None:
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def _mattr(mattr) -> str:
    return f", {' '.join(mattr)}" if mattr else ""
