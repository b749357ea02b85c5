"""Files that survive a crash, and folders with one owner.

Everything rlhf-gym writes whose loss matters goes through here:

* `atomic_write`: a file is the old one or the whole new one (a temporary sibling, fsync, atomic rename).
* `atomic_directory`: a directory (a checkpoint, a task's assets) is filled in a temporary sibling, every file
  fsynced, then put in the place of the old one in one step (`replace_directory`), so a reader sees the old
  complete directory or the new complete one, never a mix.
* `write_manifest` / `verify_manifest`: the sha256 of every file of such a directory, written last, checked
  before anything is loaded from it.
* `append_line`: one record appended to a log in one write, fsynced (a reader drops a torn last line).
* `FolderLock`: one writer per output folder, an OS lock (``flock``) that the kernel releases when its owner dies,
  so a crashed run never leaves it stuck.

A process killed at any point leaves at most a hidden ``.NAME.tmp-*`` sibling behind (safe to delete), never a
damaged ``NAME``. `fault_point` marks the steps between writes, so that tests can stop a save at each of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MANIFEST = "manifest.json"

FAULT_HOOK: Callable[[str], None] | None = None
"""Called with a step's name at every `fault_point`; tests set it to stop a write there (None: nothing)."""


def fault_point(name: str) -> None:
    """A point between two writes where a crash must leave no damage (a no-op unless a test sets `FAULT_HOOK`)."""
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


def _fsync_directory(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` so that a crash leaves the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write {path.name}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def atomic_write_json(path: str | os.PathLike, value) -> None:
    """`atomic_write` of `value` as indented JSON (serialised first: an unserialisable value writes nothing)."""
    atomic_write(path, json.dumps(value, indent=1) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (no newline inside it) to `path` in a single write, then fsync.

    A crash can tear only the last line; `read_lines` drops such a line.
    """
    if "\n" in line:
        raise ValueError("append_line writes one line: the text holds a newline")
    with open(path, "ab") as f:
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path: str | os.PathLike) -> tuple[list[str], bool]:
    """The complete lines of a log written by `append_line`, and whether a torn last line (no newline: a crash
    mid-write) was dropped."""
    data = Path(path).read_bytes()
    torn = bool(data) and not data.endswith(b"\n")
    lines = data.decode("utf-8", errors="replace").split("\n")
    return [line for line in lines[:-1] if line.strip()], torn


# ---------------------------------------------------------------- directories
def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):  # not on this filesystem
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(a), None, str(b))


def replace_directory(new: Path, target: Path) -> None:
    """Put the directory `new` at `target` (a sibling), replacing a previous `target` in one step.

    On Linux the two are exchanged atomically and the old one then deleted. Elsewhere the old one is first renamed
    to ``.NAME.old-*``; a crash between the two renames leaves `target` missing and the old complete directory
    beside it, which `missing_target_hint` names.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        _fsync_directory(target.parent)
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    if _exchange(new, target):
        _fsync_directory(target.parent)
        fault_point("exchanged")
        shutil.rmtree(new)  # now the old directory
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old)  # an empty directory is replaced
    fault_point("moved old aside")
    os.rename(new, target)
    _fsync_directory(target.parent)
    shutil.rmtree(old)


def missing_target_hint(target: str | os.PathLike) -> str:
    """For a missing `target`: where a save interrupted between its renames left the previous version, if any."""
    target = Path(target)
    olds = sorted(target.parent.glob(f".{target.name}.old-*")) if target.parent.is_dir() else []
    if not olds:
        return ""
    return (f" (a save was interrupted: the previous version is in {olds[-1]}; rename it to {target.name} to "
            f"use it)")


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory below `directory` (what another library wrote there, too)."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_directory(path)
    _fsync_directory(directory)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(path) as tmp:`` fill `tmp`; when the block ends without an error, `tmp` is fsynced
    and replaces `path` (`replace_directory`). An error, or a crash, leaves `path` as it was."""
    target = Path(target)
    if target.is_symlink():  # a save through a link replaces the folder it points to, and keeps the link
        target = Path(os.path.realpath(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as error:
        raise OSError(error.errno, f"cannot write {target}: {error.strerror} (a save fills a temporary folder "
                                   f"beside it, in {target.parent})") from None
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes a private folder; what we save is for its owner's group
            path.chmod(0o755 if path.is_dir() else 0o644)
        fsync_tree(tmp)
        fault_point("filled")
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def foreign_entries(directory: str | os.PathLike, listed: set[str] | None) -> list[str]:
    """What in `directory` is not among `listed` (relative "/"-separated file paths that a previous save of ours
    wrote; None: nothing is ours), with the folders above listed files counted as ours. Symbolic links are never
    ours. Sorted relative paths."""
    directory = Path(directory)
    owned = set()
    for name in listed or ():
        parts = Path(name).parts
        owned.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    foreign = []
    for root, dirs, names in os.walk(directory):
        for name in sorted(dirs + names):
            path = Path(root) / name
            relative = path.relative_to(directory).as_posix()
            if relative not in owned or path.is_symlink():
                foreign.append(relative)
        dirs[:] = [d for d in dirs if (Path(root) / d).relative_to(directory).as_posix() in owned]
    return sorted(foreign)


def refuse_foreign(directory: str | os.PathLike, listed: set[str] | None, what: str) -> None:
    """`ValueError` naming `directory` and the first foreign entries (`foreign_entries`) unless it is missing,
    empty, or holds only what a previous save of `what` wrote (`listed`): a save replaces the whole folder, so it
    never replaces one that holds anything else."""
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a folder: refusing to replace it with {what}")
    foreign = foreign_entries(directory, listed)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        reason = (f"its {MANIFEST} does not list" if listed is not None
                  else f"it is neither empty nor {what} (whose {MANIFEST} lists its files); it holds")
        raise ValueError(f"refusing to write {what} to {directory}: a save replaces the whole folder, and {reason} "
                         f"{shown}. Choose a new or empty folder, or move those files away")


# ---------------------------------------------------------------- manifests
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike, extra: dict | None = None) -> dict:
    """Write ``manifest.json`` into `directory` with the sha256 and size of every other file (and `extra`)."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {**(extra or {}), "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify_manifest(directory: str | os.PathLike, what: str = "directory") -> dict:
    """The manifest of `directory` once every file it lists is present with its size and sha256; `ValueError`
    naming the first file that is missing or differs (a damaged or hand-edited `what`) otherwise."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a {what}: no such directory{missing_target_hint(directory)}")
    if not path.is_file():
        raise ValueError(f"{directory} is not a {what}: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is damaged ({error}): not a {what} rlhf-gym can verify") from None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
            for e in files.values()):
        raise ValueError(f"{path} is damaged (its \"files\" are not name → {{sha256, bytes}}): not a {what} "
                         "rlhf-gym can verify")
    for name, expected in sorted(files.items()):
        file = directory / name
        if not file.is_file():
            raise ValueError(f"{what} {directory} is incomplete: {name} is missing")
        if file.stat().st_size != expected["bytes"] or sha256_file(file) != expected["sha256"]:
            raise ValueError(f"{what} {directory} is damaged: {name} does not match its sha256 in {MANIFEST}")
    return manifest


@contextlib.contextmanager
def verified_snapshot(directory: str | os.PathLike, what: str = "directory",
                      attempts: int = 3) -> Iterator[tuple[Path, dict]]:
    """``with verified_snapshot(path) as (copy, manifest):`` read from `copy`, a private copy of `directory` whose
    every file matches its manifest (`verify_manifest`; `ValueError` naming the damage otherwise), so that a save
    swapping `directory` while it is read cannot hand the reader files of two versions.

    The copy hard-links the files (a save never rewrites a file in place: it swaps in a new folder, so a linked file
    stays as it was), or copies them where links are impossible. A copy that fails to verify because a save swapped
    `directory` meanwhile (its manifest changed) is made again, up to `attempts` times. Deleted on exit.
    """
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        verify_manifest(directory, what)  # raises, naming what is missing
    for attempt in range(attempts):
        copy, listed = _scratch(directory), b""
        try:
            try:
                listed = (directory / MANIFEST).read_bytes()
                (copy / MANIFEST).write_bytes(listed)
                for name in _listed_files(listed):
                    _link_or_copy(directory / name, copy / name)
                manifest = verify_manifest(copy, what)
            except (OSError, ValueError) as error:
                if attempt + 1 < attempts and _changed(directory / MANIFEST, listed):
                    continue  # a save swapped the folder while it was copied: copy the new version
                raise ValueError(str(error).replace(str(copy), str(directory))) from None
            yield copy, manifest
            return
        finally:
            shutil.rmtree(copy, ignore_errors=True)


def _scratch(directory: Path) -> Path:
    """A private folder beside `directory` (so that hard links work), or in the system's temporary folder."""
    try:
        return Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.read-"))
    except OSError:  # a read-only parent
        return Path(tempfile.mkdtemp(prefix=f"{directory.name}.read-"))


def _listed_files(manifest: bytes) -> list[str]:
    """The file names a manifest lists ([] if it does not parse: `verify_manifest` then says so)."""
    try:
        files = json.loads(manifest)["files"]
    except (ValueError, KeyError, TypeError):
        return []
    return [name for name in files if isinstance(name, str) and ".." not in Path(name).parts] \
        if isinstance(files, dict) else []


def _changed(path: Path, before: bytes) -> bool:
    try:
        return path.read_bytes() != before
    except OSError:
        return True


def _link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link `source` at `destination` (a copy where links are impossible); a missing source is skipped (the
    manifest check then names it)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except FileNotFoundError:
        return
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            shutil.copy2(source, destination)


# ---------------------------------------------------------------- ownership
class FolderInUse(RuntimeError):
    """Another live process owns the output folder."""


class FolderLock:
    """One writer per folder: ``with FolderLock(out_dir):`` holds an exclusive ``flock`` on ``out_dir/.lock``.

    A second owner gets `FolderInUse` naming the process that holds it. The kernel drops the lock when its process
    exits, however it exits, so a killed run never leaves the folder locked; it is also released with this object
    (keep a reference for as long as the folder is yours). (Where ``fcntl`` does not exist, e.g. Windows, the lock
    is a no-op.)
    """

    def __init__(self, folder: str | os.PathLike, what: str = "output folder"):
        self.folder, self.what, self._fd = Path(folder), what, None

    def acquire(self) -> FolderLock:
        if self._fd is not None:  # already held by this object
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FolderInUse(f"{self.folder} is in use by another run (pid {owner}): one {self.what} has one "
                              f"writer; wait for it, stop it, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:  # an owner dropped without release (as a crashed run's) frees the folder
        self.release()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

