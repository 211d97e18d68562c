"""Temporary directories next to a destination, named after the process that owns them:
`.NAME.tmp-<pid>@<host>-<hex>`.

Whatever must appear complete or not at all (a converted checkpoint, a draft head, the default
model) is written into such a directory and renamed to NAME at the end; on an error the writer
removes it. A writer killed before that (kill -9, power loss) cannot, so `make` removes the ones
left by processes that are gone (this host, no such pid) before it makes a new one for the same
destination. Those of a live process, of another host or with a name it cannot read stay.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid

from jaxspec.errors import UserError

_OWNER = re.compile(r"(\d+)@(.+)-[0-9a-f]{12}")  # pid@host-hex


def _prefix(dst: str) -> str:
    return f".{os.path.basename(dst)}.tmp-"


def _owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:12]}"


def _is_stale(owner: str) -> bool:
    """Whether `owner` (pid@host-hex) names a process of this host that no longer exists."""
    match = _OWNER.fullmatch(owner)
    if match is None or match[2] != socket.gethostname():
        return False
    try:
        os.kill(int(match[1]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # PermissionError: it exists, another user's
        return False
    return False


def _remove_stale(dst: str) -> None:
    """Remove the temporary directories for dst whose process is gone."""
    parent, prefix = os.path.dirname(dst), _prefix(dst)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and _is_stale(name[len(prefix):]):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def make(dst: str) -> str:
    """A new empty directory next to dst (unlike mkdtemp's, it honours the umask), after
    removing the stale ones of dst; UserError when it cannot be created."""
    parent = os.path.dirname(dst)
    tmp = os.path.join(parent, _prefix(dst) + _owner())
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale(dst)
        os.mkdir(tmp)
    except OSError as e:
        raise UserError(f"cannot create {tmp}: {e.strerror}") from None
    return tmp
