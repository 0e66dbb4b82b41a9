"""Reading a file that holds a secret (the HMAC key, the VMs' VNC password).

One set of rules for every such file, so they cannot drift apart: a regular file, not open to
other users (group access is allowed: ``0640``, owned by the daemon's group), of a bounded
size, read whole minus one trailing newline.  Each error names the file and what to do.
"""

from __future__ import annotations

import os
import stat


class PrivateFileError(ValueError):
    """A secret's file cannot be used; the message names the file and what to do."""


def read_private_file(path: str, what: str, max_bytes: int) -> bytes:
    """The bytes of ``path`` (``what`` names it in errors, e.g. "the HMAC secret file"),
    minus one trailing newline."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise PrivateFileError(f"{path}: {what} is not a regular file")
            if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
                raise PrivateFileError(
                    f"{path}: {what} is accessible to all users"
                    f" (mode {stat.S_IMODE(info.st_mode):04o}); run chmod o-rw {path}"
                )
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise PrivateFileError(f"{path}: cannot read {what}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise PrivateFileError(
            f"{path}: {what} is larger than {max_bytes} bytes; is it the right file?"
        )
    for newline in (b"\r\n", b"\n"):
        if data.endswith(newline):
            return data[: -len(newline)]
    return data
