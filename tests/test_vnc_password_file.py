"""``[vnc] password_file``: read like every secret's file, refused with the file named and
its content never quoted."""

from __future__ import annotations

import pytest

from twisted_novnc.config import ConfigError, parse_config
from twisted_novnc.privatefile import PrivateFileError
from twisted_novnc.processes.service import shared_credentials
from twisted_novnc.vnc.password_file import read_vnc_password

PASSWORD = "Zq9-only-here"


def write(path, data: bytes, mode: int):  # type: ignore[no-untyped-def]
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_owner_and_group_access_is_fine(tmp_path, mode):
    """0600, 0640 and 0400 are read; one trailing newline is not part of the password."""
    path = write(tmp_path / "pw", PASSWORD.encode() + b"\n", mode)
    assert read_vnc_password(path) == PASSWORD


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_access_by_others_is_refused_naming_the_file(tmp_path, mode):
    """A file others may read or write is refused, naming it and the fix."""
    path = write(tmp_path / "pw", PASSWORD.encode(), mode)
    with pytest.raises(PrivateFileError) as caught:
        read_vnc_password(path)
    assert path in str(caught.value) and "chmod o-rw" in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (PASSWORD.encode() + b"\nsecond\n", "one line"),
        (b"\xff\xfe" + PASSWORD.encode(), "not UTF-8"),
        (b"x" * 1025, "larger than 1024 bytes"),
    ],
)
def test_what_is_not_one_password_is_refused(tmp_path, data, problem):
    """Empty, several lines, not UTF-8, or too large: refused, the content not quoted."""
    path = write(tmp_path / "pw", data, 0o600)
    with pytest.raises(PrivateFileError) as caught:
        read_vnc_password(path)
    assert problem in str(caught.value) and path in str(caught.value)
    assert PASSWORD not in str(caught.value) and "second" not in str(caught.value)


def test_a_missing_file_is_named(tmp_path):
    """A file that is not there is named."""
    with pytest.raises(PrivateFileError, match="nowhere"):
        read_vnc_password(str(tmp_path / "nowhere"))


def test_start_up_error_names_config_section_key_and_file(tmp_path):
    """The daemon's start-up (and an upgrade) turns a bad file into a ConfigError naming the
    config file, [vnc] password_file and the password file."""
    path = write(tmp_path / "pw", PASSWORD.encode(), 0o644)
    settings = parse_config(f"[vnc]\npassword_file = {path}\n", "daemon.ini")
    with pytest.raises(ConfigError) as caught:
        shared_credentials(settings)
    text = str(caught.value)
    assert text.startswith("daemon.ini: [vnc] password_file:") and path in text
    assert PASSWORD not in text


def test_no_file_no_shared_credentials():
    """Without password_file there is no shared password (a row's may still be used)."""
    assert shared_credentials(parse_config("[vnc]\npassword_column = pw\n", "x.ini")) is None
