"""Output files of the commands: checked before the work, written whole or not at all.

A batch run can take twenty minutes; finding only at its end that ``--out`` names a
directory that does not exist loses the run. :func:`output_path` is a click callback that
checks the place first, and :func:`write_atomically` writes a file next to its
destination and renames it over, so a reader (or a run stopped half-way) never sees half
a file, and an older file stays as it was until the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import click


def output_problem(path: str | Path) -> str | None:
    """Why a file could not be written at ``path`` (None: it can, as far as one can tell
    without writing the file itself)."""
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        return f"{target} is a directory"
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{target} is not writable"
    # The permission bits do not say everything (a read-only mount, /proc, and for root
    # every directory passes): make the file the write would make first, and remove it.
    probe = parent / f".{target.name}.{secrets.token_hex(6)}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        return f"cannot create a file in {parent}: {exc.strerror}"
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def output_path(ctx: click.Context, param: click.Parameter, value: str | Path | None
                ) -> str | Path | None:
    """Click callback for an output file option: a clear usage error before any work when
    the file could not be written (``-``, standard output, passes)."""
    if value is None or str(value) == "-":
        return value
    problem = output_problem(value)
    if problem is not None:
        raise click.BadParameter(problem, ctx=ctx, param=param)
    return value


def output_directory(ctx: click.Context, param: click.Parameter, value: str | None
                     ) -> str | None:
    """Click callback for an output directory option: made (with its parents) and
    checked for a file to be written in it, before any work."""
    if value is None:
        return value
    try:
        Path(value).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create directory {value}: {exc.strerror}",
                                 ctx=ctx, param=param) from None
    problem = output_problem(Path(value) / "output")
    if problem is not None:
        raise click.BadParameter(problem, ctx=ctx, param=param)
    return value


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole: into a temporary file in the same directory,
    flushed to disk, then renamed over ``path``. On any failure the temporary file is
    removed and ``path`` is as it was."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
    # Created exclusively with mode 0666, which the kernel narrows by the umask: the
    # file gets the mode any new file would (mkstemp's 0600 would need a chmod, and
    # learning the umask means setting it, for every thread of the process at once).
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
