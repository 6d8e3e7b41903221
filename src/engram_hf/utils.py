"""Atomic writes: a file or directory is written beside its target and renamed into place, so a
crash at any point leaves either the previous version or the new one, never a mix.

Written files and directories get the permissions the user's umask gives ordinary files (not the
0600/0700 of ``tempfile``), so colleagues on a shared machine can read what was saved.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

_TMP, _OLD = "tmp", "old"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """A fresh name beside ``target`` for a temp copy, tagged with this process (for crash cleanup)."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


_sibling = temp_sibling


def remove_stale_siblings(target: Path) -> None:
    """Delete temp siblings of ``target`` left by writers that died (their pid is gone)."""
    for kind in (_TMP, _OLD):
        for p in target.parent.glob(f".{target.name}.{kind}-*"):
            try:
                pid = int(p.name.rsplit(f".{kind}-", 1)[1].split("-")[0])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")


def _fsync_dir(path: Path) -> None:
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


def _apply_umask(root: Path) -> None:
    """Give what ``write`` produced the modes the umask gives ordinary files and directories (some
    writers, transformers' safetensors save among them, go through 0600 temp files)."""
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Hard-link (or copy) into ``new`` the entries of ``old`` that ``new`` lacks and ``keep`` accepts."""
    for entry in old.iterdir():
        dest = new / entry.name
        if dest.exists() or not keep(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def atomic_write_dir(
    target: str | os.PathLike,
    write: Callable[[Path], None],
    keep_existing: Callable[[str], bool] | None = None,
) -> Path:
    """Run ``write(tmp_dir)``, then put ``tmp_dir`` in place of ``target`` in one atomic swap.

    A crash or error midway leaves any previous ``target`` untouched (and the temp directory is
    removed at the next write to the same target). With ``keep_existing``, entries of the previous
    ``target`` that the new one lacks and the predicate accepts are carried over (hard links).
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = _sibling(target, _TMP)
    os.mkdir(tmp)  # mode 0777 & ~umask, like any directory the user makes
    try:
        write(tmp)
        commit_dir(tmp, target, keep_existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def commit_dir(tmp: Path, target: Path, keep_existing: Callable[[str], bool] | None = None) -> None:
    """Put the finished directory ``tmp`` in place of ``target`` in one atomic swap (the second half
    of ``atomic_write_dir``, for writers that fill ``tmp`` together, such as several ranks)."""
    _apply_umask(tmp)
    if target.exists():
        if keep_existing is not None:
            _carry_over(target, tmp, keep_existing)
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous version
        else:
            old = _sibling(target, _OLD)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


def atomic_write_file(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_path)`` on a temp file beside ``target``, then rename it into place."""
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = _sibling(target, _TMP)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


# What a model save writes: stale copies of these in the previous checkpoint are not carried over
# (they would be shards of the old weights).
_MODEL_FILES = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "config.json",
    "generation_config.json",
    "*.py",
)


def keep_non_model_files(name: str) -> bool:
    """Whether a file of a previous checkpoint survives a new save into the same directory."""
    return not any(fnmatch.fnmatch(name, pattern) for pattern in _MODEL_FILES)


def atomic_save_pretrained(save: Callable[[Path], None], save_directory: str | os.PathLike) -> Path:
    """``save(tmp)`` (a transformers ``save_pretrained``) made atomic; other files in the directory
    (a tokenizer, a model card) are kept."""
    return atomic_write_dir(save_directory, save, keep_existing=keep_non_model_files)
