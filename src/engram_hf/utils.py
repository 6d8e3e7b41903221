"""Atomic writes: a file or directory is written beside its target and renamed into place, so a
crash at any point leaves either the previous version or the new one, never a mix.

Written files and directories get the permissions the user's umask gives ordinary files (not the
0600/0700 of ``tempfile``), so colleagues on a shared machine can read what was saved.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import fnmatch
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

_TMP, _OLD = "tmp", "old"
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


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


def read_json(path: str | os.PathLike, what: str = "file"):
    """A JSON file's content, with errors that name the file: missing, or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} at {path}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (corrupt file?): {e}") from None


def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """A fresh name beside ``target`` for a temp copy, tagged with this process (for crash cleanup)."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


_sibling = temp_sibling


def _stale_pattern(target: Path) -> re.Pattern:
    # ``.name.tmp-PID-HEX``, and the temp siblings of such temps (a save that writes into a temp
    # directory makes its own beside it): ``..name.tmp-PID-HEX.tmp-PID2-HEX2`` and so on.
    return re.compile(rf"^\.+{re.escape(target.name)}((?:\.(?:{_TMP}|{_OLD})-\d+-[0-9a-f]+)+)$")


def remove_stale_siblings(target: Path) -> None:
    """Delete temp siblings of ``target`` (nested ones included) left by writers that died: every
    process named in the temp's name is gone."""
    pattern = _stale_pattern(target)
    for p in target.parent.iterdir():
        match = pattern.match(p.name)
        if match is None:
            continue
        pids = [int(pid) for pid in re.findall(r"-(\d+)-[0-9a-f]+", match.group(1))]
        if not any(_pid_alive(pid) for pid in pids):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


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


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool], rel: str = "") -> None:
    """Copy into ``new`` the entries of ``old`` that ``new`` lacks and ``keep`` accepts (``keep`` sees
    each path relative to the top, ``"sub/file"``, so it can refuse files inside folders too).

    Copies, never hard links: the new version must not share inodes with the old one (a file kept
    open or linked elsewhere would otherwise see later writes)."""
    for entry in old.iterdir():
        name = f"{rel}{entry.name}"
        dest = new / entry.name
        if not keep(name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if dest.exists() and not dest.is_dir():
                continue
            made = not dest.exists()
            dest.mkdir(exist_ok=True)
            _carry_over(entry, dest, keep, f"{name}/")
            if made and not any(dest.iterdir()):
                dest.rmdir()  # everything in it was refused: do not leave an empty shell
        elif not dest.exists() and not dest.is_symlink():
            clone_file(entry, dest)


def _copy_bytes(fin, fout) -> None:
    """Copy an open file's bytes in the kernel where possible (``copy_file_range``)."""
    remaining = os.fstat(fin.fileno()).st_size
    try:
        while remaining > 0:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), min(remaining, 1 << 30))
            if n == 0:
                break
            remaining -= n
    except (AttributeError, OSError):
        fin.seek(0)
        fout.seek(0)
        fout.truncate()
        shutil.copyfileobj(fin, fout, 16 << 20)


def clone_file(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Copy ``src`` to ``dst`` (with its mode and times) as an independent file: a later write to
    either never shows in the other. On filesystems with copy-on-write clones (btrfs, XFS,
    bcachefs, ...) it is a reflink, which shares blocks until one side writes and costs no time or
    space; elsewhere it is a full copy. Never a hard link."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return dst
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        except OSError:
            # No clones here (ext4, tmpfs, overlayfs, across filesystems): copy the bytes.
            _copy_bytes(fin, fout)
    shutil.copystat(src, dst)
    return dst


def atomic_write_dir(
    target: str | os.PathLike,
    write: Callable[[Path], None],
    keep_existing: Callable[[str], bool] | None = None,
) -> Path:
    """Run ``write(tmp_dir)``, then put ``tmp_dir`` in place of ``target`` in one atomic swap.

    A crash or error midway leaves any previous ``target`` untouched (and the temp directory is
    removed at the next write to the same target). With ``keep_existing``, entries of the previous
    ``target`` that the new one lacks and the predicate accepts are carried over (copied).
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
)
# Code that transformers imports or runs from a checkpoint directory (``trust_remote_code`` modules,
# a ``custom_generate/`` that replaces ``generate``): a save leaves no code in the directory but
# the model files it writes itself, so none of it is carried over, at any depth.
_CODE_FILES = ("*.py", "*.pyc", "*.pyo", "*.pyd", "*.so", "*.dylib", "*.dll")
_CODE_DIRS = ("custom_generate", "__pycache__")


def keep_non_model_files(relpath: str) -> bool:
    """Whether an entry of a previous checkpoint (path relative to it) survives a new save into the
    same directory: data such as a tokenizer or a README does; weights, configs and code do not."""
    parts = Path(relpath).parts
    if any(part in _CODE_DIRS for part in parts):
        return False
    if any(fnmatch.fnmatch(parts[-1], pattern) for pattern in _CODE_FILES):
        return False
    return not (len(parts) == 1 and any(fnmatch.fnmatch(parts[0], pattern) for pattern in _MODEL_FILES))


def atomic_save_pretrained(save: Callable[[Path], None], save_directory: str | os.PathLike) -> Path:
    """``save(tmp)`` (a transformers ``save_pretrained``) made atomic; other files in the directory
    (a tokenizer, a model card) are kept."""
    return atomic_write_dir(save_directory, save, keep_existing=keep_non_model_files)
