"""Where the tool may write, and publishing a finished folder there.

Every folder nirvana writes (``prune --out``, ``apply --out``, ``finetune --out``, :func:`save_pruned`)
goes through this module, with these guarantees:

- :func:`check_target` runs before any heavy work. It compares real paths (``~`` expanded, every
  symbolic link resolved), so an output that is a source, lies inside one or contains one is refused
  however it is spelled. An existing output is replaced only with ``overwrite``, and only when this
  tool wrote it (it holds the :data:`MARKER_FILE` that every published folder gets, or the
  ``plan.json`` and ``report.json`` of older versions). A parent that is a file, is not writable, is
  read-only or is a kernel pseudo filesystem (``/proc``, ``/sys``, ``/dev``) is refused in plain words.
- :func:`staged` writes into a temporary folder beside the output, named ``.<name>.nirvana-tmp-*``
  and holding an :data:`OWNER_FILE` (pid, host, boot, process start time). At the end the output is
  checked again and the folder renamed into place atomically: with no-replace semantics when the
  output was absent, or swapped with the old one (removed only afterwards) under ``overwrite``. A
  folder that appeared, or changed, at the output meanwhile makes this run lose: it fails in one
  line, removes its temporary folder and leaves the other folder alone. On any error or interrupt
  the temporary folder is removed.
- A run killed outright (SIGKILL, power loss) leaves its temporary folder behind; the next run that
  targets the same output removes it, once its owner file shows that the process is gone. Nothing
  else is ever removed: not a folder without an owner file, not one whose owner still runs or ran on
  another host.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the no-replace rename alone guards the publish
    fcntl = None

MARKER_FILE = ".nirvana"  # in every folder this tool publishes: what --overwrite may replace
OWNER_FILE = ".nirvana-owner"  # in every temporary folder: who may still be writing it
TEMP_INFIX = ".nirvana-tmp-"
MARKER = {"written_by": "nirvana"}
# Files of the checkpoints older versions wrote; both together mark a folder as this tool's.
LEGACY_FILES = ("plan.json", "report.json")
# Filesystems the kernel makes up: writing there changes the system, never saves a file.
PSEUDO_FILESYSTEMS = frozenset(
    "proc sysfs devtmpfs devpts cgroup cgroup2 debugfs tracefs securityfs configfs bpf pstore efivarfs "
    "fusectl mqueue binfmt_misc autofs hugetlbfs rpc_pipefs nsfs".split()
)
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))
WRITABLE_SYSTEM_FOLDERS = (Path("/dev/shm"),)  # shared memory: a plain tmpfs, where files may go

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EINVAL), errno.EOPNOTSUPP}


class OutputExistsError(FileExistsError, ValueError):
    """The output folder exists (or appeared) and may not be replaced.

    Both a file-system condition and bad input, so that callers catching either see it.
    """


def real_path(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded and every symbolic link resolved, made absolute."""
    return Path(os.path.realpath(Path(path).expanduser()))


def is_ours(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was published by nirvana: it holds the marker, or the files older versions wrote."""
    folder = Path(folder)
    marker = folder / MARKER_FILE
    if marker.is_file() and not marker.is_symlink():
        try:
            if json.loads(marker.read_text()).get("written_by") == MARKER["written_by"]:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return all((folder / n).is_file() and not (folder / n).is_symlink() for n in LEGACY_FILES)


def check_target(
    out: str | os.PathLike,
    *,
    sources: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    name: str = "out",
) -> Path:
    """The real path of the output folder ``out``, once it is known that the tool may write it there.

    Cheap (a few ``stat`` calls), so it runs before any model loads.

    Args:
        out: the output folder.
        sources: the folders or files the run reads (the model); ``out`` may not be one, lie inside
            one or contain one. Those that do not exist are skipped.
        overwrite: an existing ``out`` may be replaced, if nirvana wrote it.
        name: the argument's name in messages (``"out"``, ``"out_dir"``).

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is False (also a ValueError).
        ValueError: any other reason, in one line naming the paths.
    """
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise ValueError(f"{name}: expected a folder path, got {out!r}")
    real = real_path(out)
    shown = _shown(out, real)
    for source in sources:
        src = real_path(source)
        if not src.exists():
            continue
        kind = "folder" if src.is_dir() else "file"
        # By identity as well as by name: a bind mount or a case-insensitive disk spells one folder two ways.
        if _same(real, src) or (real.exists() and any(_same(p, real) for p in src.parents)):
            raise ValueError(f"{name}: {shown} would replace the model's source {kind} {str(src)!r}")
        if any(_same(p, src) for p in real.parents):
            raise ValueError(f"{name}: {shown} lies inside the model's source folder {str(src)!r}, which is only read")
    if real.exists():
        if not real.is_dir():
            raise ValueError(f"{name}: {shown} exists and is not a folder")
        if not overwrite:
            raise OutputExistsError(
                f"{name}: {shown} already exists; pass --overwrite to replace it (overwrite=True from Python)"
            )
        if not is_ours(real):
            raise ValueError(
                f"{name}: {shown} was not written by nirvana; refusing to replace it (nirvana marks its folders "
                f"with a {MARKER_FILE} file)"
            )
    _check_parent(real, shown, name)
    return real


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a == b


def _shown(given, real: Path) -> str:
    text = os.fspath(given)
    if os.path.abspath(os.path.expanduser(text)) == str(real):
        return repr(text)
    return f"{text!r} (really {str(real)!r})"


def _check_parent(real: Path, shown: str, name: str) -> None:
    """Refuse, in plain words, a place where the folder's parent cannot be made or written."""
    ancestor = real.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    where = repr(str(ancestor))
    if not ancestor.is_dir():
        raise ValueError(f"{name}: {shown} cannot be made, as {where} is a file, not a folder")
    fs = _filesystem_type(ancestor)
    system = _under(ancestor, SYSTEM_FOLDERS) and not _under(ancestor, WRITABLE_SYSTEM_FOLDERS)
    if fs in PSEUDO_FILESYSTEMS or system:
        raise ValueError(f"{name}: {where} is a system folder of the kernel{f' ({fs})' if fs else ''}, not for files")
    try:
        read_only = bool(os.statvfs(ancestor).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:
        raise ValueError(f"{name}: {where} is on a read-only filesystem")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: this user may not write in {where}")


def _under(path: Path, folders: tuple[Path, ...]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def _filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (``"ext4"``, ``"proc"``), from the mount table."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best, fs = "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = _unescape(fields[4])
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fs = point, right.split()[0]
    return fs


def _unescape(field: str) -> str:
    # The mount table writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _plain(err: OSError, name: str, folder: Path) -> ValueError:
    """An OSError from making or writing ``folder``, in plain words."""
    where = repr(str(folder))
    if err.errno in (errno.EACCES, errno.EPERM):
        return ValueError(f"{name}: this user may not write in {where}")
    if err.errno == errno.EROFS:
        return ValueError(f"{name}: {where} is on a read-only filesystem")
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return ValueError(f"{name}: no space left on the disk holding {where}")
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        return ValueError(f"{name}: {where} cannot be made, as part of its path is a file, not a folder")
    reason = (err.strerror or type(err).__name__).lower()
    return ValueError(f"{name}: cannot write in {where} ({reason})")


# --- Who owns a temporary folder ---------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process ``pid``, or None without such an entry."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name, in parentheses, may hold spaces: the fields that matter follow the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def owner_record() -> dict:
    """What :data:`OWNER_FILE` says about this process."""
    stat = _proc_stat(os.getpid())
    return {
        **MARKER,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "start_ticks": stat[1] if stat else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def owner_is_gone(record: dict) -> bool:
    """Whether the process an :data:`OWNER_FILE` names has surely ended; False whenever in doubt."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or record.get("host") != socket.gethostname():
        return False  # another host's pid says nothing here
    boot = _boot_id()
    if boot and record.get("boot_id") and record["boot_id"] != boot:
        return True  # the machine has restarted since
    stat = _proc_stat(pid)
    if stat is not None:
        state, ticks = stat
        if state in ("Z", "X"):  # killed, not yet reaped by its parent
            return True
        recorded = record.get("start_ticks")
        return isinstance(recorded, int) and ticks != recorded  # that pid now belongs to a newer process
    try:  # not in /proc (or /proc hides other users' processes): ask the kernel directly
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _read_owner(folder: Path) -> dict | None:
    path = folder / OWNER_FILE
    if not path.is_file() or path.is_symlink():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by") == MARKER["written_by"] else None


def remove_stale(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that earlier, killed runs left beside ``out``; returns those removed.

    Only folders named ``.<out name>.nirvana-tmp-*`` whose owner file names a process that has ended.
    """
    out = real_path(out)
    prefix = f".{out.name}{TEMP_INFIX}"
    try:
        entries = [e for e in os.scandir(out.parent) if e.name.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        record = _read_owner(Path(entry.path))
        if record is not None and owner_is_gone(record):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


# --- Temporary folders and publishing ----------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _make_temp(out: Path, name: str) -> Path:
    """A fresh temporary folder beside ``out``, with this process's owner file in it."""
    _check_parent(out, repr(str(out)), name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _plain(err, name, out.parent) from None
    remove_stale(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_INFIX}", dir=out.parent))
    except OSError as err:
        raise _plain(err, name, out.parent) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published folder should read like any other
        _write_json(tmp / OWNER_FILE, owner_record())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


@contextlib.contextmanager
def scratch(out: str | os.PathLike, *, name: str = "out") -> Iterator[Path]:
    """A temporary folder beside ``out`` for files that are copied into the output, removed on leaving.

    It follows the scheme of :func:`staged` (name, owner file), so that one left by a killed run is
    removed by the next run that targets ``out``.
    """
    tmp = _make_temp(real_path(out), name)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike] = (),
    name: str = "out",
) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the ``with`` block completes.

    ``out`` is checked on entry (:func:`check_target`) and again just before the rename. The marker
    is written inside, every file flushed to disk, and the folder renamed into place: with
    no-replace semantics when ``out`` was absent, or swapped with the old ``out`` (which is removed
    only afterwards) when it existed and ``overwrite`` allowed replacing it.

    Raises:
        OutputExistsError: ``out`` exists without ``overwrite``, or another writer created or
            replaced it while the block ran (this run then loses and leaves the other folder alone).
        ValueError: what :func:`check_target` refuses.

    On any failure (or interrupt) the temporary folder is removed and ``out`` is left as it was.
    """
    out = check_target(out, sources=list(sources), overwrite=overwrite, name=name)
    before = _identity(out)
    tmp = _make_temp(out, name)
    try:
        yield tmp
        _write_json(tmp / MARKER_FILE, MARKER)
        _sync_tree(tmp)
        _publish(tmp, out, before, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _sync_tree(folder: Path) -> None:
    """Flush every file (and the folder) to disk, so the rename below never publishes a torn file."""
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the files are what matter
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _parent_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` itself, so that nirvana runs publish into it one at a time."""
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):  # a filesystem without locks: the no-replace rename still guards
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


_libc_renameat2 = None


def _renameat2(src: Path, dst: Path, flags: int) -> int:
    """Linux renameat2(2): 0 on success, else the errno (ENOSYS where libc lacks it)."""
    global _libc_renameat2
    if _libc_renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError, TypeError):  # no such libc function, or no libc (Windows)
            return errno.ENOSYS
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _libc_renameat2 = fn
    if _libc_renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return 0
    return ctypes.get_errno()


def _lost(name: str, out: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{name}: {str(out)!r} was created or replaced by another writer while this run was writing; left it as it is"
    )


def _publish(tmp: Path, out: Path, before: tuple[int, int] | None, name: str) -> None:
    with _parent_lock(out.parent):
        # Every nirvana run publishing here holds the lock, so none can slip in between this check
        # and the rename; the no-replace rename and the identity check after an exchange guard
        # against any other writer.
        if _identity(out) != before:
            raise _lost(name, out)
        if before is None:
            _move_noreplace(tmp, out, name)
        elif not is_ours(out):  # its marker went while this run was writing
            raise ValueError(f"{name}: {str(out)!r} was not written by nirvana; refusing to replace it")
        else:
            _swap(tmp, out, before, name)
    (out / OWNER_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _fsync(out.parent)


def _move_noreplace(tmp: Path, out: Path, name: str) -> None:
    err = _renameat2(tmp, out, _RENAME_NOREPLACE)
    if err in _UNSUPPORTED:
        # No renameat2 here: the parent lock and this re-check stand in for it.
        if os.path.lexists(out):
            raise _lost(name, out)
        os.rename(tmp, out)
        return
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise _lost(name, out)
    if err:
        raise _plain(OSError(err, os.strerror(err)), name, out.parent)


def _swap(tmp: Path, out: Path, before: tuple[int, int], name: str) -> None:
    """Put ``tmp`` at ``out`` and remove the old ``out``, which is never absent in between."""
    err = _renameat2(tmp, out, _RENAME_EXCHANGE)
    if err == 0:
        old = tmp
        if _identity(old) != before:  # another folder took the old one's place just before the exchange
            _renameat2(tmp, out, _RENAME_EXCHANGE)  # give it back
            raise _lost(name, out)
    elif err in _UNSUPPORTED:
        # No atomic exchange here: set the old folder aside, then move the new one in.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_INFIX}", dir=out.parent))
        os.rename(out, old)  # replaces the empty placeholder
        try:
            _move_noreplace(tmp, out, name)
        except BaseException:
            os.rename(old, out)
            raise
    else:
        raise _plain(OSError(err, os.strerror(err)), name, out.parent)
    # Owned by this run from here on, so that a kill while removing it leaves what the next run cleans.
    with contextlib.suppress(OSError):
        _write_json(old / OWNER_FILE, owner_record())
    shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "MARKER_FILE",
    "OWNER_FILE",
    "OutputExistsError",
    "check_target",
    "is_ours",
    "owner_is_gone",
    "owner_record",
    "real_path",
    "remove_stale",
    "scratch",
    "staged",
]
