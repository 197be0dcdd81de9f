"""The work directory of one reconstruction: manifest, journal, parts and lock.

A work directory (default ``OUT.h5.xvr/``) looks like this::

    manifest.json      the plan, input fingerprint, config and weights hashes, normalisation
    journal.jsonl      append-only log: one JSON line per finished (or failed) work unit
    parts/             one small HDF5 file per finished unit (see :mod:`xvr_batch.io.parts`)
    lock               who is working here (pid, host, start time); see :mod:`xvr_batch.lock`

Crash-safety guarantees (the process may be SIGKILLed, or the node may lose power, at any point):

* **Manifest.** Written to a temporary file in the same directory, flushed and fsynced, then
  renamed over ``manifest.json``, and the directory is fsynced
  (:func:`xvr_batch.durable.atomic_write_bytes`). A reader sees either the old manifest or the
  new one, never a mixture. It is read as JSON only.
* **Parts.** Written under a temporary name and renamed (see :mod:`xvr_batch.io.parts`), so a part
  file under its final name is always complete. Its sha256 is recorded in the journal only *after*
  the rename, so the journal never points at a part that was not fully written.
* **Journal.** Every record is one line, written with a single ``os.write`` on an ``O_APPEND``
  descriptor and fsynced before :meth:`WorkDir.record_done` returns. Each line carries a sha256
  (``crc``) of its own canonical JSON (:func:`xvr_batch.durable.canonical_json`). A crash can at
  worst leave a truncated last line (or, on some filesystems, a run of NUL bytes);
  :meth:`WorkDir.read_journal` skips such lines, and the next append starts on a fresh line. A unit
  is done only if its latest valid record says so *and* its part path is exactly
  ``parts/unit-NNNNNN.h5`` of that unit *and* (when verified) that part is a regular file with the
  recorded sha256; anything else is simply redone. Losing a record therefore costs recomputation,
  never correctness.
* **Replanning.** :meth:`WorkDir.create` discards any previous journal *before* it writes the new
  manifest, so a crash in between leaves a manifest with no completions (everything is redone)
  rather than a new manifest with stale completions. It never deletes through a symlink: a
  symlinked ``parts`` is replaced by a real directory, its target left alone.
* **Untrusted content.** Paths from the journal are untrusted: absolute paths, ``..`` components
  and symlinks that resolve outside the work directory are refused. Every reader (manifest, plan,
  journal, status) returns a result or raises a one-line :class:`UserError` whatever the files
  hold (garbage, deep nesting, huge lines, a FIFO or a directory in place of a file); FIFOs are
  never opened for reading for real.
* **Lock.** :meth:`WorkDir.lock` gives a :class:`xvr_batch.lock.WorkDirLock`: a flock on the
  directory itself, taken over silently from a dead holder.

A work directory that cannot be written (read-only filesystem, permissions) gives a one-line
:class:`UserError` from every writer; a full disk raises :class:`xvr_batch.durable.DiskFullError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import pathlib
import re
import stat
import time
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from xvr_batch.durable import (
    DiskFullError,
    atomic_write_bytes,
    canonical_hash,
    canonical_json,
    fsync_dir,
    is_disk_full,
    pid_alive,
    remove_stale_temps_in,
    sha256_file,
)
from xvr_batch.errors import UserError
from xvr_batch.lock import WorkDirLock, not_writable

__all__ = [
    "MANIFEST_VERSION",
    "REQUIRED_MANIFEST_KEYS",
    "WorkDir",
    "journal_crc",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: 2: ``{version, tool_version, created, job, plan, options}`` (1 repeated job facts at the top level).
MANIFEST_VERSION = 2
REQUIRED_MANIFEST_KEYS = ("version", "job", "plan", "options")
#: Manifest keys that, when present, must be JSON objects (the pipeline reads them as such).
_OBJECT_MANIFEST_KEYS = ("plan", "weights", "settings", "normalisation", "options", "job", "model",
                         "plan_args", "paths")

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "journal.jsonl"
PARTS_NAME = "parts"
LOCK_NAME = "lock"

#: Fields every journal record carries, which ``extra`` may not override.
_RESERVED_FIELDS = frozenset(
    {"unit", "part", "sha256", "frames", "t", "status", "error", "crc", "bytes"}
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: A part's final name.
_PART_NAME = re.compile(r"unit-\d{6,}\.h5")
#: What ``create`` removes from ``parts/``: parts and the temporaries of today's and older releases.
_PART_FILE = re.compile(r"\.?unit-\d{6,}\.h5(\.tmp-[0-9a-f-]+)?")
_LEGACY_PART_TEMP = re.compile(r"unit-\d{6,}\.h5\.tmp-(\d{1,10})")
#: Longest error message kept in a ``failed`` record.
_MAX_ERROR_CHARS = 2000
#: Longest journal line read (a record is a few hundred bytes); longer lines are skipped.
_MAX_RECORD_BYTES = 1 << 20
#: Largest manifest read (a plan of 100 000 units is ~10 MB).
_MAX_MANIFEST_BYTES = 256 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def journal_crc(record: Dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``crc`` field."""
    return canonical_hash({k: v for k, v in record.items() if k != "crc"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any, limit: int = 120) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (for messages about tampering)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


# ----------------------------------------------------------------------------------------------
# Work directory
# ----------------------------------------------------------------------------------------------


class WorkDir:
    """A work directory. Constructing one touches nothing on disk.

    Attributes set by the readers:

    * ``journal_skipped`` -- number of journal lines the last :meth:`read_journal` skipped
      (truncated, too long, not JSON, wrong types, bad crc).
    * ``problems`` -- ``{unit_id: reason}`` for units whose latest record says done but which
      :meth:`completed_units` did not accept (missing or corrupt part, unsafe or foreign path,
      frames that do not match the plan).
    """

    def __init__(self, path: PathLike):
        self.path: pathlib.Path = pathlib.Path(os.path.abspath(os.fspath(path)))
        self.manifest_path: pathlib.Path = self.path / MANIFEST_NAME
        self.journal_path: pathlib.Path = self.path / JOURNAL_NAME
        self.parts_dir: pathlib.Path = self.path / PARTS_NAME
        self.lock_path: pathlib.Path = self.path / LOCK_NAME
        self.journal_skipped: int = 0
        self.problems: Dict[int, str] = {}

    def __repr__(self) -> str:
        return f"WorkDir({str(self.path)!r})"

    # -- errors --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn the OS errors of a write into what a user can act on.

        Not writable -> UserError; a directory or a link where a file belongs -> UserError;
        a full disk -> :class:`DiskFullError`; anything else unchanged.
        """
        try:
            yield
        except DiskFullError:
            raise
        except OSError as exc:
            err = not_writable(exc, self.path)
            if err is not None:
                raise err from None
            where = exc.filename or self.path
            if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.EEXIST):
                raise UserError(
                    f"work directory {self.path} is damaged: {where} is in the way "
                    f"({exc.strerror}); remove it, or choose another --workdir"
                ) from None
            if is_disk_full(exc):
                raise DiskFullError(where) from exc
            raise

    def _open_dir(self, rel: Optional[str] = None, dir_fd: Optional[int] = None) -> int:
        """A descriptor of the work directory (or of ``rel`` in it, never through a symlink)."""
        if rel is None:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | _DIRECTORY)
        return os.open(rel, os.O_RDONLY | os.O_CLOEXEC | _DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)

    def _read_regular(self, path: pathlib.Path, what: str, limit: int) -> bytes:
        """The bytes of ``path`` if it is a regular file (not a link) of at most ``limit`` bytes.

        ``FileNotFoundError`` if it does not exist; :class:`UserError` for anything else that
        is wrong. A FIFO is opened non-blocking and refused, never read.
        """
        fix = "rerun with --force-replan or delete the work directory"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{what} {path} is a symlink; remove it, or {fix}") from None
            if exc.errno == errno.ENOTDIR:
                raise UserError(f"{self.path} is not a directory; check the --workdir path") from None
            raise UserError(f"cannot read {what} {path}: {exc.strerror}; check its permissions") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{what} {path} is {_kind(st.st_mode)}, not a file; remove it, or {fix}")
            if st.st_size > limit:
                raise UserError(f"{what} {path} is implausibly large ({st.st_size} bytes); {fix}")
            chunks = []
            total = 0
            while True:
                block = os.read(fd, 1 << 20)
                if not block:
                    break
                total += len(block)
                if total > limit:
                    raise UserError(f"{what} {path} is implausibly large (over {limit} bytes); {fix}")
                chunks.append(block)
            return b"".join(chunks)
        except OSError as exc:
            raise UserError(f"cannot read {what} {path}: {exc.strerror}; {fix}") from None
        finally:
            os.close(fd)

    # -- manifest ------------------------------------------------------------------------------

    def exists(self) -> bool:
        """True if the work directory has a manifest (a regular file, or a link to one)."""
        return self.manifest_path.is_file()

    def create(self, manifest: Dict[str, Any]) -> None:
        """Create the directory and ``parts/`` if needed and write ``manifest`` as a fresh plan.

        Any previous journal is removed first (and with it every recorded completion), together
        with leftover part files and temporaries, because they belong to the previous plan.
        Nothing is deleted through a symlink: a symlinked journal or part is removed as a link, a
        symlinked ``parts`` is replaced by a real directory. A ``parts`` or journal that is some
        other non-file (a directory where the journal belongs, a file where ``parts`` belongs) is
        refused with a :class:`UserError`.
        """
        _validate_manifest(manifest, where=str(self.manifest_path), on_error=ValueError)
        with self._writing():
            make_workdir(self.path)
            fsync_dir(self.path.parent)
            dfd = self._open_dir()
            try:
                if self._remove_journal(dfd):
                    os.fsync(dfd)
                    log.debug("removed the previous journal %s", self.journal_path)
                self._reset_parts(dfd)
            finally:
                os.close(dfd)
            self.write_manifest(manifest)
            fsync_dir(self.path)

    def _remove_journal(self, dfd: int) -> bool:
        try:
            st = os.lstat(JOURNAL_NAME, dir_fd=dfd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            raise UserError(
                f"journal {self.journal_path} is a directory; remove it, or choose another --workdir"
            )
        os.unlink(JOURNAL_NAME, dir_fd=dfd)  # a link is removed as a link
        return True

    def _reset_parts(self, dfd: int) -> None:
        """Make ``parts`` a real, empty-of-parts directory without following any link."""
        try:
            st: Optional[os.stat_result] = os.lstat(PARTS_NAME, dir_fd=dfd)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            log.warning("%s is a symlink; replacing it by a directory (its target is left alone)",
                        self.parts_dir)
            os.unlink(PARTS_NAME, dir_fd=dfd)
            st = None
        if st is None:
            os.mkdir(PARTS_NAME, 0o755, dir_fd=dfd)
        elif not stat.S_ISDIR(st.st_mode):
            raise UserError(
                f"{self.parts_dir} is {_kind(st.st_mode)}, where the parts folder belongs; remove "
                "it, or choose another --workdir"
            )
        pfd = self._open_dir(PARTS_NAME, dir_fd=dfd)
        try:
            for entry in os.listdir(pfd):
                if not _PART_FILE.fullmatch(entry):
                    continue
                try:
                    os.unlink(entry, dir_fd=pfd)
                except (FileNotFoundError, IsADirectoryError):
                    pass
                except PermissionError as exc:  # EPERM: a directory on some systems
                    if exc.errno != errno.EPERM:
                        raise
        finally:
            os.close(pfd)

    def write_manifest(self, manifest: Dict[str, Any]) -> None:
        """Write ``manifest`` atomically (tmp file, fsync, rename, fsync dir)."""
        _validate_manifest(manifest, where=str(self.manifest_path), on_error=ValueError)
        data = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
        with self._writing():
            atomic_write_bytes(self.manifest_path, data.encode("utf-8"))

    def read_manifest(self) -> Dict[str, Any]:
        """Read and validate ``manifest.json`` (JSON only); :class:`UserError` if missing/bad."""
        where = str(self.manifest_path)
        try:
            raw = self._read_regular(self.manifest_path, "manifest", _MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise UserError(
                f"no manifest at {where}: {self.path} is not an xvr_batch work directory; "
                "check the path, or run reconstruct to create it"
            ) from None
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise UserError(
                f"manifest {where} is corrupt (not valid JSON: {why[:200]}); "
                "rerun with --force-replan or delete the work directory"
            ) from None
        _validate_manifest(manifest, where=where, on_error=UserError)
        return manifest

    def plan_units(self, manifest: Optional[Dict[str, Any]] = None) -> Dict[int, Tuple[int, int]]:
        """``{unit_id: (start, stop)}`` from ``manifest["plan"]["units"]`` (read if not given)."""
        if manifest is None:
            manifest = self.read_manifest()
        plan = manifest.get("plan") if isinstance(manifest, dict) else None
        units = plan.get("units") if isinstance(plan, dict) else None
        bad = (
            f"manifest {self.manifest_path} has a corrupt plan (plan.units must be a list of "
            "{id, start, stop} with unique ids >= 0 and 0 <= start <= stop); "
            "rerun with --force-replan or delete the work directory"
        )
        if not isinstance(units, list):
            raise UserError(bad)
        out: Dict[int, Tuple[int, int]] = {}
        for unit in units:
            if not isinstance(unit, dict):
                raise UserError(bad)
            uid, start, stop = unit.get("id"), unit.get("start"), unit.get("stop")
            if not (_is_int(uid) and _is_int(start) and _is_int(stop)) or uid in out:
                raise UserError(bad)
            if uid < 0 or not 0 <= start <= stop:
                raise UserError(bad)
            out[uid] = (start, stop)
        return out

    # -- parts ---------------------------------------------------------------------------------

    def part_path(self, unit_id: int) -> pathlib.Path:
        """Where the part of ``unit_id`` lives: ``parts/unit-000042.h5``."""
        if not _is_int(unit_id) or unit_id < 0:
            raise ValueError(f"unit id must be a non-negative int, got {unit_id!r}")
        return self.parts_dir / f"unit-{unit_id:06d}.h5"

    def part_relpath(self, unit_id: int) -> str:
        """The part path of ``unit_id`` relative to the work directory, as the journal stores it."""
        return self.part_path(unit_id).relative_to(self.path).as_posix()

    def resolve_part(self, rel: str) -> pathlib.Path:
        """Turn a journal-recorded relative path into a path inside the work directory.

        Refuses (:class:`UserError`) empty or absolute paths, any ``..`` component, and paths
        that do not resolve (following symlinks) to something strictly inside the work directory.
        Returns ``self.path / rel``.
        """
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise UserError(
                f"invalid part path {_show(rel)} in {self.journal_path}; "
                "delete that journal line or the work directory"
            )
        pure = pathlib.PurePosixPath(rel)
        if pure.is_absolute() or rel.startswith("\\") or ".." in pure.parts:
            raise UserError(
                f"part path {_show(rel)} in {self.journal_path} escapes the work directory "
                f"{self.path}; part paths must be relative and stay inside it: delete that journal line"
            )
        candidate = self.path.joinpath(*pure.parts)
        try:
            root = self.path.resolve()
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # symlink loop, name too long
            raise UserError(
                f"part path {_show(rel)} under {self.path} cannot be resolved "
                f"({_show(str(exc), 200)}); remove the link and rerun"
            ) from None
        if root not in resolved.parents:
            raise UserError(
                f"part path {_show(rel)} under {self.path} resolves to {_show(str(resolved))}, "
                "outside the work directory (symlink?); remove the link and rerun"
            )
        return candidate

    def remove_stale_temps(self) -> int:
        """Remove part temporaries left in ``parts/`` by dead processes of this host.

        Temporaries of live processes and of other hosts are kept, so this is safe while other
        nodes write parts; call it with the work-directory lock held. Returns how many went.
        """
        removed = len(remove_stale_temps_in(self.parts_dir, lambda name: bool(_PART_NAME.fullmatch(name))))
        try:
            dfd = self._open_dir()
            try:
                pfd = self._open_dir(PARTS_NAME, dir_fd=dfd)
            finally:
                os.close(dfd)
        except OSError:
            return removed
        try:
            for entry in os.listdir(pfd):
                m = _LEGACY_PART_TEMP.fullmatch(entry)
                if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                    try:
                        os.unlink(entry, dir_fd=pfd)
                        removed += 1
                    except OSError:
                        pass
        finally:
            os.close(pfd)
        return removed

    # -- journal -------------------------------------------------------------------------------

    def record_done(
        self,
        unit_id: int,
        rel_part: str,
        sha256: str,
        frames: Tuple[int, int],
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Append (and fsync) a record saying ``unit_id`` is done, its part and the part's sha256.

        Call it only after the part has been renamed into place. ``rel_part`` must be
        :meth:`part_relpath` of ``unit_id`` (``ValueError`` otherwise; :class:`UserError` if it
        escapes the work directory). ``frames`` is ``(start, stop)``. ``extra`` adds JSON fields
        (not the reserved ones).
        """
        if not _is_int(unit_id) or unit_id < 0:
            raise ValueError(f"unit id must be a non-negative int, got {unit_id!r}")
        sha = str(sha256).lower()
        if not _HEX64.fullmatch(sha):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
        start, stop = (int(frames[0]), int(frames[1]))
        if not 0 <= start <= stop:
            raise ValueError(f"frames must be (start, stop), 0 <= start <= stop; got {frames!r}")
        path = self.resolve_part(rel_part)
        rel = pathlib.PurePosixPath(rel_part).as_posix()
        if rel != self.part_relpath(unit_id):
            raise ValueError(f"the part of unit {unit_id} is {self.part_relpath(unit_id)}, not {rel_part!r}")
        record: Dict[str, Any] = {
            "unit": unit_id,
            "status": "done",
            "part": rel,
            "sha256": sha,
            "frames": [start, stop],
            "t": time.time(),
        }
        try:
            record["bytes"] = os.stat(path).st_size
        except OSError:
            pass
        if extra:
            clash = _RESERVED_FIELDS.intersection(extra)
            if clash:
                raise ValueError(f"extra may not set the reserved journal fields {sorted(clash)}")
            record.update(extra)
        self._append(record)

    def record_failed(self, unit_id: int, error: str) -> None:
        """Append (and fsync) a record saying ``unit_id`` failed with ``error`` (one line)."""
        if not _is_int(unit_id) or unit_id < 0:
            raise ValueError(f"unit id must be a non-negative int, got {unit_id!r}")
        message = " ".join(str(error).split())[:_MAX_ERROR_CHARS]
        self._append({"unit": unit_id, "status": "failed", "error": message, "t": time.time()})

    def _append(self, record: Dict[str, Any]) -> None:
        record = dict(record)
        record["crc"] = journal_crc(record)
        line = (canonical_json(record) + "\n").encode("utf-8")
        with self._writing():
            make_workdir(self.path)
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW
            fd = os.open(self.journal_path, flags, 0o644)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise UserError(
                        f"journal {self.journal_path} is {_kind(st.st_mode)}, not a file; remove it, "
                        "or choose another --workdir"
                    )
                size = st.st_size
                empty = size == 0
                if not empty and os.pread(fd, 1, size - 1) != b"\n":
                    # The previous writer died mid-line: start ours on a fresh line so that only
                    # the torn record is lost.
                    line = b"\n" + line
                written = os.write(fd, line)
                if written != len(line):  # pragma: no cover - a full disk fails with ENOSPC
                    raise DiskFullError(self.journal_path, f"short write of {written}/{len(line)} bytes")
                os.fsync(fd)
            except OSError as exc:
                if is_disk_full(exc) and not isinstance(exc, DiskFullError):
                    raise DiskFullError(self.journal_path) from exc
                raise
            finally:
                os.close(fd)
            if empty:  # possibly a new file: make its directory entry durable
                fsync_dir(self.path)

    def read_journal(self) -> Dict[int, Dict[str, Any]]:
        """The latest valid record per unit.

        Lines that are truncated, too long, not JSON, have wrong field types or a bad crc are
        skipped and counted in ``self.journal_skipped``; blank lines are ignored. A missing
        journal is empty. A journal that is not a regular file (a directory, a FIFO, a symlink)
        or cannot be read is a :class:`UserError`.
        """
        self.journal_skipped = 0
        fix = "remove it (every unit is then redone), or rerun with --force-replan"
        try:
            fd = os.open(self.journal_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"journal {self.journal_path} is a symlink; {fix}") from None
            if exc.errno == errno.ENOTDIR:
                raise UserError(f"{self.path} is not a directory; check the work directory path") from None
            raise UserError(f"cannot read journal {self.journal_path}: {exc.strerror}; {fix}") from None
        latest: Dict[int, Dict[str, Any]] = {}
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise UserError(f"journal {self.journal_path} is {_kind(mode)}, not a file; {fix}")
            with os.fdopen(fd, "rb", buffering=1 << 16, closefd=False) as fh:
                while True:
                    line = fh.readline(_MAX_RECORD_BYTES + 1)
                    if not line:
                        break
                    if len(line) > _MAX_RECORD_BYTES:
                        while line and not line.endswith(b"\n"):  # skip the rest of the line
                            line = fh.readline(1 << 20)
                        self.journal_skipped += 1
                        continue
                    chunk = line[:-1] if line.endswith(b"\n") else line
                    if not chunk.strip():
                        continue
                    record = _parse_record(chunk)
                    if record is None:
                        self.journal_skipped += 1
                        continue
                    latest[record["unit"]] = record
        except OSError as exc:
            raise UserError(f"cannot read journal {self.journal_path}: {exc.strerror}; {fix}") from None
        finally:
            os.close(fd)
        if self.journal_skipped:
            log.warning(
                "%s: skipped %d damaged journal line(s)", self.journal_path, self.journal_skipped
            )
        return latest

    def completed_units(self, verify: bool = True) -> Dict[int, Dict[str, Any]]:
        """Units whose latest record is ``done`` and whose part can be trusted.

        The part path must be exactly :meth:`part_relpath` of the record's unit and stay inside
        the work directory. If the manifest exists, the unit must be in the plan with the same
        frames. With ``verify`` the part must be a regular file with the recorded sha256.
        Rejected units are listed in ``self.problems`` (unit -> reason); they are not returned
        and should be redone.
        """
        plan = self.plan_units() if self.exists() else None
        return self._accept(self.read_journal(), plan, verify)

    def _accept(
        self,
        journal: Dict[int, Dict[str, Any]],
        plan: Optional[Dict[int, Tuple[int, int]]],
        verify: bool,
    ) -> Dict[int, Dict[str, Any]]:
        """The ``done`` records of ``journal`` that pass the checks of :meth:`completed_units`."""
        self.problems = {}
        done: Dict[int, Dict[str, Any]] = {}
        for uid, record in sorted(journal.items()):
            if record.get("status", "done") != "done":
                continue
            reason = self._reject(uid, record, plan, verify)
            if reason is None:
                done[uid] = record
            else:
                self.problems[uid] = reason
        for uid, reason in sorted(self.problems.items()):
            log.warning("%s; it will be redone", reason)
        return done

    def _reject(
        self,
        uid: int,
        record: Dict[str, Any],
        plan: Optional[Dict[int, Tuple[int, int]]],
        verify: bool,
    ) -> Optional[str]:
        """Why the done ``record`` of ``uid`` cannot be trusted, or None if it can."""
        try:
            path = self.resolve_part(record["part"])
        except UserError as exc:
            return str(exc)
        expected = self.part_relpath(uid)
        if record["part"] != expected:
            return (
                f"the journal record of unit {uid} names the part {_show(record['part'])} in "
                f"{self.journal_path}, but the part of unit {uid} is {expected}"
            )
        if plan is not None:
            if uid not in plan:
                return f"unit {uid} is not in the plan of {self.manifest_path}"
            if tuple(record["frames"]) != plan[uid]:
                return (
                    f"unit {uid} was recorded for frames {record['frames']} but the plan has "
                    f"{list(plan[uid])}"
                )
        if not verify:
            return None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return f"part {path} of unit {uid} is missing"
        except OSError as exc:
            return f"part {path} of unit {uid} is unreadable: {exc.strerror}"
        if not stat.S_ISREG(st.st_mode):
            return f"part {path} of unit {uid} is {_kind(st.st_mode)}, not a part file"
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            return f"part {path} of unit {uid} is missing"
        except OSError as exc:
            return f"part {path} of unit {uid} is unreadable: {exc.strerror}"
        if actual != record["sha256"]:
            return f"part {path} of unit {uid} is corrupt (sha256 mismatch)"
        return None

    def status(self, verify: bool = False) -> Dict[str, Any]:
        """Progress from the plan and the journal.

        Returns ``{"n_units", "done", "failed", "pending", "frames_done", "n_frames",
        "problems", "journal_skipped", "consistency"}``; the three lists hold unit ids, sorted;
        ``consistency`` merges the done units' LR consistency summaries
        (:func:`xvr_batch.consistency.merge_summaries`; None when no record has one). ``verify``
        hashes every part (slow on big runs); otherwise the journal is trusted. A unit whose
        latest record is a failure is in ``failed`` only; one with a rejected part is pending.
        """
        manifest = self.read_manifest()
        plan = self.plan_units(manifest)
        journal = self.read_journal()
        completed = self._accept(journal, plan, verify)
        done = sorted(u for u in plan if u in completed)
        failed = sorted(
            u for u in plan if u not in completed and journal.get(u, {}).get("status") == "failed"
        )
        pending = sorted(set(plan) - set(done) - set(failed))
        n_frames = manifest["plan"].get("n_frames")
        if not _is_int(n_frames):
            n_frames = sum(stop - start for start, stop in plan.values())
        from xvr_batch.consistency import merge_summaries

        return {
            "n_units": len(plan),
            "done": done,
            "failed": failed,
            "pending": pending,
            "frames_done": sum(plan[u][1] - plan[u][0] for u in done),
            "n_frames": n_frames,
            "problems": {u: r for u, r in self.problems.items() if u in plan},
            "journal_skipped": self.journal_skipped,
            "consistency": merge_summaries(completed[u].get("consistency") for u in done),
        }

    # -- lock ----------------------------------------------------------------------------------

    def lock(self, **kwargs: Any) -> WorkDirLock:
        """A (not yet acquired) :class:`~xvr_batch.lock.WorkDirLock` on this directory; use it as ``with``."""
        return WorkDirLock(self.lock_path, **kwargs)


def make_workdir(path: pathlib.Path) -> None:
    """Create the work directory (and its parents) if needed; a file in its place is a UserError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"work directory {path} exists but is not a directory; choose another --workdir") from None


def _validate_manifest(manifest: Any, where: str, on_error: type) -> None:
    fix = "rerun with --force-replan or delete the work directory"
    if not isinstance(manifest, dict):
        raise on_error(f"manifest {where} is corrupt (not a JSON object); {fix}")
    version = manifest.get("version")
    if not _is_int(version) or version != MANIFEST_VERSION:
        raise on_error(
            f"manifest {where} has version {_show(version, 40)}, this xvr_batch reads version "
            f"{MANIFEST_VERSION}; {fix}"
        )
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise on_error(f"manifest {where} is corrupt (missing {', '.join(missing)}); {fix}")
    for key in _OBJECT_MANIFEST_KEYS:
        if key in manifest and not isinstance(manifest[key], dict):
            raise on_error(f"manifest {where} is corrupt ({key} is not an object); {fix}")
    for key in ("fingerprint", "config_hash"):
        if not isinstance(manifest["job"].get(key), str):
            raise on_error(f"manifest {where} is corrupt (job.{key} is not a string); {fix}")


def _finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _parse_record(line: bytes) -> Optional[Dict[str, Any]]:
    """A validated journal record, or None for anything damaged."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    crc = record.get("crc")
    unit = record.get("unit")
    if not isinstance(crc, str) or not _is_int(unit) or unit < 0:
        return None
    if not _finite_number(record.get("t")):
        return None
    status = record.get("status", "done")
    if status == "done":
        part, sha, frames = record.get("part"), record.get("sha256"), record.get("frames")
        if not isinstance(part, str) or not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            return None
        if not (isinstance(frames, list) and len(frames) == 2 and all(_is_int(f) for f in frames)):
            return None
        if not 0 <= frames[0] <= frames[1]:
            return None
    elif status == "failed":
        if not isinstance(record.get("error"), str):
            return None
    else:
        return None
    try:
        if journal_crc(record) != crc:
            return None
    except (ValueError, RecursionError):  # NaN/inf somewhere in extra fields: cannot be canonical
        return None
    return record
