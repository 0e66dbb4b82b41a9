"""VNC Authentication's DES against TigerVNC itself: its ``vncpasswd -f`` (Debian
tigervnc-tools, which .ci/run installs) and a challenge and response a real Xvnc accepted."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from twisted_novnc.vnc.vncauth import obfuscated_password, vnc_auth_response

#: Captured from Xvnc (TigerVNC 1.12) -SecurityTypes VncAuth with a password file for
#: "secret12": the challenge it sent, and the response it accepted (SecurityResult 0).
XVNC_PASSWORD = "secret12"
XVNC_CHALLENGE = bytes.fromhex("772c7e604044725c7d78e3584bc11179")
XVNC_RESPONSE = bytes.fromhex("de64b0cf9774ea251aa9b2c1fdca697e")

#: ``printf '%s\n' PASSWORD | vncpasswd -f`` from TigerVNC 1.12, for the tests that run
#: without it as well.
VNCPASSWD_OUTPUT = {
    "secret12": bytes.fromhex("24b5ae4ce15503c6"),
    "abc": bytes.fromhex("9c0a172d3482e122"),
    "pässwörd": bytes.fromhex("b2fd172a9c69b143"),
}

#: The fixed key TigerVNC obfuscates password files with (common/rfb/obfuscate.cxx).
OBFUSCATION_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])

PASSWORDS = ["secret12", "abc", "pässwörd", "a-much-longer-password", "x", "€uro-sign", "12345678"]


def vncpasswd(password: str) -> bytes:
    """What TigerVNC's ``vncpasswd -f`` writes for ``password`` typed on a UTF-8 terminal."""
    path = shutil.which("vncpasswd")
    assert path, "vncpasswd is missing: apt-get install tigervnc-tools (.ci/run installs it)"
    done = subprocess.run([path, "-f"], input=password.encode() + b"\n", capture_output=True,
                          check=True, timeout=10)
    return done.stdout


@pytest.mark.parametrize("password", PASSWORDS)
def test_obfuscated_password_is_what_vncpasswd_writes(password):
    """The password file bytes are exactly those of TigerVNC's own vncpasswd, non-ASCII too."""
    assert obfuscated_password(password) == vncpasswd(password)


@pytest.mark.parametrize(("password", "output"), VNCPASSWD_OUTPUT.items())
def test_obfuscated_password_matches_recorded_vncpasswd(password, output):
    """Recorded vncpasswd output pins the obfuscation even where vncpasswd is absent."""
    assert obfuscated_password(password) == output


def test_response_a_real_xvnc_accepted():
    """The response to a challenge from a real Xvnc is the one it accepted."""
    assert vnc_auth_response(XVNC_PASSWORD, XVNC_CHALLENGE) == XVNC_RESPONSE


@pytest.mark.parametrize("password", PASSWORDS)
def test_response_is_the_des_tigervnc_obfuscates_with(password):
    """With the obfuscation key as password, each 8-byte half of the response is vncpasswd's
    output: the same DES, key bit order and padding as TigerVNC's d3des."""
    key_as_password = OBFUSCATION_KEY.decode("ascii")
    block = password.encode()[:8].ljust(8, b"\0")
    assert vnc_auth_response(key_as_password, block * 2) == vncpasswd(password) * 2


def test_password_is_truncated_to_eight_bytes():
    """Only the first 8 bytes of the password count, as in every VNC server."""
    challenge = bytes(range(16))
    assert vnc_auth_response("12345678-ignored", challenge) == vnc_auth_response(
        "12345678", challenge)
    assert vnc_auth_response("1234567", challenge) != vnc_auth_response("12345678", challenge)


def test_short_password_is_zero_padded():
    """A short password is padded with zero bytes, so an explicit NUL changes nothing."""
    challenge = bytes(range(16))
    assert vnc_auth_response("abc", challenge) == vnc_auth_response("abc\0\0", challenge)


@pytest.mark.parametrize("size", [0, 8, 15, 17, 32])
def test_challenge_must_have_sixteen_bytes(size):
    """A challenge of another size is a caller's bug, not something to answer."""
    with pytest.raises(ValueError, match="16 bytes"):
        vnc_auth_response("secret12", bytes(size))
