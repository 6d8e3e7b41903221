"""Atomic writes: a file or directory is written beside its target and renamed into place, so a
crash at any point leaves either the previous version or the new one, never a mix.

Written files and directories get the permissions the user's umask gives ordinary files (not the
0600/0700 of ``tempfile``), so colleagues on a shared machine can read what was saved.

The commands' outputs (``claim_output_dir``, ``claim_output_file``) never replace what the command
did not write: a directory a command writes carries a marker naming the command, and only a later
run of the same command replaces it without ``overwrite``.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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


def iter_jsonl_records(path: str | os.PathLike, error: type[Exception] = ValueError):
    """``(line number, object)`` for each non-empty line of a JSON-lines file; a line that is not
    valid JSON, or not a JSON object, raises ``error`` naming ``path:line``."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n} is not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{n} is not a JSON object (got {type(row).__name__}).")
            yield n, row


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


# ----------------------------------------------------------------------------- command outputs
OUTPUT_MARKER = ".engram-hf-output.json"


class OutputExistsError(FileExistsError):
    """A command's output path holds something the command may not replace."""


def _resolved(path) -> Path:
    return Path(path).expanduser().resolve()


def _check_not_an_input(path: Path, shown, command: str, inputs: Iterable, option: str) -> None:
    """Refuse an output that is, lies inside or holds something the command reads."""
    for given in inputs:
        source = _resolved(given)
        if path == source or source in path.parents:
            where = "is" if path == source else "lies inside"
            raise OutputExistsError(
                f"{option} {shown} {where} {given}, which engram-hf {command} reads: choose a path outside it."
            )
        if path in source.parents:
            raise OutputExistsError(
                f"{option} {shown} holds {given}, which engram-hf {command} reads: choose another path."
            )


def read_output_marker(directory) -> dict | None:
    """The marker of a directory a command wrote (``command``, ``source``, ``entries``), or None."""
    try:
        marker = json.loads((Path(directory) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@dataclass(frozen=True)
class OutputDir:
    """A directory ``claim_output_dir`` lets ``command`` write. ``own``: the entries an earlier run of
    the same command wrote there, which a new run replaces; every other entry is the user's and is
    kept (``carry``, when given, narrows what of it a replacement carries over)."""

    path: Path
    command: str
    source: str | None = None
    own: frozenset[str] = frozenset()
    carry: Callable[[str], bool] | None = None

    def keeps(self, relpath: str) -> bool:
        """Whether an entry of the previous directory (path relative to it) survives a replacement."""
        top = Path(relpath).parts[0]
        return top != OUTPUT_MARKER and top not in self.own and (self.carry is None or self.carry(relpath))

    def mark(self, directory: str | os.PathLike | None = None, entries: Iterable[str] | None = None) -> None:
        """Write the marker into ``directory`` (default: the output itself), naming the command, its
        source and ``entries``: what a later run may replace whole (None: nothing, for commands that
        write into the directory in place)."""
        directory = Path(directory) if directory is not None else self.path
        directory.mkdir(parents=True, exist_ok=True)
        marker = {"command": self.command}
        if self.source is not None:
            marker["source"] = self.source
        if entries is not None:
            marker["entries"] = sorted(entries)
        text = json.dumps(marker, indent=1)
        atomic_write_file(directory / OUTPUT_MARKER, lambda p: p.write_text(text, encoding="utf-8"))

    def write(self, write: Callable[[Path], None]) -> Path:
        """``atomic_write_dir``: ``write(tmp)`` fills a temp directory, which is marked and swapped in;
        the user's entries of the previous directory are carried over."""

        def fill(tmp: Path) -> None:
            write(tmp)
            self.mark(tmp, [p.name for p in tmp.iterdir() if p.name != OUTPUT_MARKER])

        return atomic_write_dir(self.path, fill, keep_existing=self.keeps)


def _refused(root: Path, keep: Callable[[str], bool], rel: str = "") -> list[str]:
    """Entries under ``root`` that ``keep`` refuses (a refused folder counts once), as ``_carry_over`` sees them."""
    out = []
    for entry in sorted(root.iterdir()):
        name = f"{rel}{entry.name}"
        if not keep(name):
            out.append(name)
        elif entry.is_dir() and not entry.is_symlink():
            out.extend(_refused(entry, keep, f"{name}/"))
    return out


def claim_output_dir(
    target: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    source: str | None = None,
    inputs: Iterable = (),
    carry: Callable[[str], bool] | None = None,
    option: str = "--out",
) -> OutputDir:
    """Check, before any work, that ``command`` may write the directory ``target``; raise
    ``OutputExistsError`` saying why not.

    Never: ``target`` is, lies inside or holds one of ``inputs`` (what the command reads), or is a
    file. An existing directory is the command's to replace when it is empty or an earlier run of the
    same command wrote it (its marker says so; from the same ``source`` when one is given); anything
    else needs ``overwrite``. Either way only what the earlier run wrote is replaced: the user's own
    entries are kept, and where ``carry`` refuses some (a checkpoint cannot keep stray weights or
    code beside new ones), dropping them needs ``overwrite`` too.
    """
    path = _resolved(target)
    _check_not_an_input(path, target, command, inputs, option)
    if not path.exists():
        return OutputDir(path, command, source, frozenset(), carry)
    if not path.is_dir():
        raise OutputExistsError(
            f"{option} {target} is a file, and engram-hf {command} writes a directory: choose another path "
            "(the file is left as it is)."
        )
    marker = read_output_marker(path)
    ours = marker is not None and marker.get("command") == command
    own = frozenset(marker.get("entries") or ()) if ours else frozenset()
    out = OutputDir(path, command, source, own, carry)
    entries = sorted(p.name for p in path.iterdir() if p.name != OUTPUT_MARKER)
    if overwrite or not entries:
        return out
    if not ours:
        writer = f" (engram-hf {marker['command']} wrote them)" if marker and marker.get("command") else ""
        raise OutputExistsError(
            f"{option} {target} already holds {_listing(entries)}{writer}: choose a new directory, or pass "
            f"--overwrite to let engram-hf {command} replace what it writes there (other files are kept)."
        )
    if source is not None and marker.get("source") != source:
        raise OutputExistsError(
            f"{option} {target} holds the output of engram-hf {command} for {marker.get('source')}, not for "
            f"{source}: choose another directory, or pass --overwrite to replace it."
        )
    if carry is not None:
        dropped = [rel for rel in _refused(path, carry) if Path(rel).parts[0] not in own | {OUTPUT_MARKER}]
        if dropped:
            raise OutputExistsError(
                f"{option} {target} holds {_listing(dropped)}, which engram-hf {command} did not write and "
                "cannot keep beside its output: move it elsewhere, or pass --overwrite to drop it."
            )
    return out


def claim_output_file(
    target: str | os.PathLike, command: str, *, overwrite: bool = False, inputs: Iterable = (), option: str = "--out"
) -> Path:
    """Check, before any work, that ``command`` may write the file ``target``: never a directory or
    one of ``inputs`` (or a path inside one); an existing file only with ``overwrite``."""
    path = _resolved(target)
    _check_not_an_input(path, target, command, inputs, option)
    if path.is_dir():
        raise OutputExistsError(f"{option} {target} is a directory: engram-hf {command} writes a file there.")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{option} {target} already exists: choose a new name, or pass --overwrite to replace it."
        )
    return path
