"""VNC Authentication's DES, as TigerVNC computes it (common/rfb/d3des.c, obfuscate.cxx).

VNC's DES is standard DES with one twist: the bits of each key byte are used in reverse
order, so the key goes through a bit reversal before a standard DES library sees it.  The
password is its UTF-8 bytes (what TigerVNC's viewer and ``vncpasswd`` use: the bytes that were
typed), truncated or zero-padded to 8; ASCII passwords are the same bytes in every encoding.
"""

from __future__ import annotations

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

#: The fixed key with which ``vncpasswd`` obfuscates a password file (d3desObfuscationKey).
_OBFUSCATION_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])

CHALLENGE_SIZE = 16


def _reversed_bits(key: bytes) -> bytes:
    return bytes(int(f"{byte:08b}"[::-1], 2) for byte in key)


def _des(key: bytes, data: bytes) -> bytes:
    """Single DES in ECB mode with VNC's key convention: triple DES with one key three times."""
    encryptor = Cipher(TripleDES(_reversed_bits(key) * 3), modes.ECB()).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _key(password: str) -> bytes:
    return password.encode("utf-8")[:8].ljust(8, b"\0")


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """The 16 bytes that answer a VNC Authentication challenge for ``password``."""
    if len(challenge) != CHALLENGE_SIZE:
        raise ValueError(f"a VNC Authentication challenge has {CHALLENGE_SIZE} bytes")
    return _des(_key(password), challenge)


def obfuscated_password(password: str) -> bytes:
    """The 8 bytes of a TigerVNC/RealVNC password file (what ``vncpasswd -f`` writes), for
    tests that start Xvnc with ``-rfbauth``."""
    return _des(_OBFUSCATION_KEY, _key(password))
