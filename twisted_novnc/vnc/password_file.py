"""``[vnc] password_file``: one VNC password for every VM, kept as a secret's file is."""

from __future__ import annotations

from twisted_novnc.privatefile import PrivateFileError, read_private_file

#: Longer than any VNC scheme takes (VNC Authentication uses 8 bytes, Plain a few hundred).
MAX_PASSWORD_BYTES = 1024


def read_vnc_password(path: str) -> str:
    """The password in ``path``: one line of UTF-8 (a trailing newline is not part of it).

    Refuses with :class:`PrivateFileError`, naming the file, what
    :func:`~twisted_novnc.privatefile.read_private_file` refuses, an empty file, more than one
    line, and text that is not UTF-8.  The message never quotes the file's content.
    """
    data = read_private_file(path, "the VNC password file", MAX_PASSWORD_BYTES)
    if not data:
        raise PrivateFileError(f"{path}: the VNC password file is empty")
    if b"\n" in data or b"\r" in data:
        raise PrivateFileError(f"{path}: the VNC password file must hold one line")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PrivateFileError(f"{path}: the VNC password file is not UTF-8 text") from None
