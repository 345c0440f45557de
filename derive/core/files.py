"""Writing files so that an interrupted or failed write leaves the previous file, never a partial one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from derive.core.errors import DeriveError


def write_atomic(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The rename is atomic on one file system: ``path`` holds either its previous content or the
    complete new one, whether ``write`` fails, Ctrl-C interrupts it or it finishes. The temporary file
    keeps ``path``'s suffix (writers that choose the format by suffix, such as ``savefig``, see the
    real one) and is removed when anything goes wrong; the result gets the usual permissions
    (0666 less the umask). Returns the path written.
    """
    path = Path(path).expanduser()
    folder = path.parent
    if not folder.is_dir():
        raise DeriveError(f"cannot write '{path}': folder '{folder}' does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".derive-", suffix=path.suffix)
    except OSError as exc:
        raise DeriveError(f"cannot write '{path}': {exc.strerror}") from None
    os.close(fd)
    _PENDING.add(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise DeriveError(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        _PENDING.discard(tmp)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


#: Temporary files of writes in progress (removed by :func:`discard_pending` when the process is
#: stopped from outside, where no ``finally`` runs).
_PENDING: set[str] = set()


def discard_pending() -> None:
    """Remove the temporary files of writes in progress (the targets keep their previous content)."""
    for tmp in list(_PENDING):
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _PENDING.clear()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


__all__ = ["discard_pending", "write_atomic"]
