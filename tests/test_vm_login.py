"""The proxy's RFB login to the VM, against scripted VMs: every version, security type and
VeNCrypt subtype, every failure, the VM's bytes cut at every boundary.

A script is what the VM sends (``VM``), what the proxy must send at that point (``Us``), where
TLS starts (``TLS``), and how it ends.  Each script is played whole, one byte at a time (then
each action must come exactly with the byte that prompts it), cut at every offset, and cut at
random: the actions must be the same every time.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_novnc.errors import Refusal
from twisted_novnc.vnc.browser_greeting import BrowserGreeting, Greeted
from twisted_novnc.vnc.vm_login import (
    MAX_REASON,
    Action,
    Failed,
    LoggedIn,
    Send,
    StartTLS,
    VMLogin,
)
from twisted_novnc.vnc.vncauth import vnc_auth_response

PASSWORD = "pa55-w0rd-xyz"
USER = "alice-the-user"
CHALLENGE = bytes(range(100, 116))
RESPONSE = vnc_auth_response(PASSWORD, CHALLENGE)
SERVER_INIT = b"\x01\x40\x00\xc8" + bytes(16) + struct.pack("!I", 4) + b"test"


@attrs.frozen
class VM:
    """Bytes the VM sends."""

    data: bytes


@attrs.frozen
class Us:
    """Bytes the proxy must send at this point."""

    data: bytes


@attrs.frozen
class TLS:
    """The proxy must ask for TLS here; the driver then reports it started."""

    verify: bool


Step = VM | Us | TLS


def version(text: str) -> bytes:
    return f"RFB {text}\n".encode()


def u8(*values: int) -> bytes:
    return bytes(values)


def u32(*values: int) -> bytes:
    return struct.pack(f"!{len(values)}I", *values)


def reason(text: bytes) -> bytes:
    return u32(len(text)) + text


def plain(user: str, password: str) -> bytes:
    return u32(len(user.encode()), len(password.encode())) + user.encode() + password.encode()


@attrs.frozen
class Case:
    """One scripted VM: the login's settings, the script, and the action that ends it."""

    name: str
    steps: tuple[Step, ...]
    end: Action
    password: str | None = PASSWORD
    username: str | None = USER
    tls_possible: bool = True
    #: What the VM sends after the SecurityResult (ServerInit: LoggedIn's leftover), or after
    #: the byte that fails the login (ignored).
    after: bytes = b""

    def machine(self) -> VMLogin:
        return VMLogin(password=self.password, username=self.username,
                       tls_possible=self.tls_possible)

    def segments(self) -> list[bytes]:
        """The VM's bytes between TLS starts (TLS cuts the stream: it is a new one after)."""
        found = [b""]
        for step in self.steps:
            if isinstance(step, VM):
                found[-1] += step.data
            elif isinstance(step, TLS):
                found.append(b"")
        found[-1] += self.after
        return found

    def expected(self) -> list[tuple[int, int, Action]]:
        """Each action with the segment and the count of its bytes that must prompt it."""
        segment, offset, actions = 0, 0, []
        for step in self.steps:
            if isinstance(step, VM):
                offset += len(step.data)
            elif isinstance(step, Us):
                actions.append((segment, offset, Send(step.data)))
            else:
                actions.append((segment, offset, StartTLS(step.verify)))
                segment, offset = segment + 1, 0
        end = attrs.evolve(self.end, leftover=self.after) if isinstance(
            self.end, LoggedIn) else self.end
        actions.append((segment, offset, end))
        return actions


def greeting(vm_version: str, ours: str, types: bytes) -> tuple[Step, ...]:
    """Version exchange and the 3.7/3.8 list of security types with the proxy's choice."""
    return (VM(version(vm_version)), Us(version(ours)), VM(u8(len(types)) + types))


def vencrypt(subtypes: Iterable[int], choice: int, vm_version: str = "003.008",
             types: bytes = u8(19)) -> tuple[Step, ...]:
    """Up to the proxy's VeNCrypt subtype choice, the VM offering ``types``."""
    listed = list(subtypes)
    return (*greeting(vm_version, vm_version, types), Us(u8(19)), VM(u8(0, 2)), Us(u8(0, 2)),
            VM(u8(0, len(listed)) + u32(*listed)), Us(u32(choice)))


OK = VM(u32(0))
AUTH = (VM(CHALLENGE), Us(RESPONSE))


def logged_in(version_: str, security: str) -> LoggedIn:
    return LoggedIn(version_, security, b"")


def failed(refusal: Refusal, detail: str) -> Failed:
    return Failed(refusal, detail)


SUCCESSES = [
    Case("3.3 None", (VM(version("003.003")), Us(version("003.003")), VM(u32(1))),
         logged_in("3.3", "None")),
    Case("3.3 VncAuth", (VM(version("003.003")), Us(version("003.003")), VM(u32(2)), *AUTH, OK),
         logged_in("3.3", "VncAuth")),
    Case("3.5 is 3.3", (VM(version("003.005")), Us(version("003.003")), VM(u32(2)), *AUTH, OK),
         logged_in("3.3", "VncAuth")),
    Case("3.7 None, no SecurityResult", (*greeting("003.007", "003.007", u8(1)), Us(u8(1))),
         logged_in("3.7", "None")),
    Case("3.7 VncAuth", (*greeting("003.007", "003.007", u8(2)), Us(u8(2)), *AUTH, OK),
         logged_in("3.7", "VncAuth")),
    Case("3.8 None has a SecurityResult", (*greeting("003.008", "003.008", u8(1)), Us(u8(1)), OK),
         logged_in("3.8", "None")),
    Case("3.8 VncAuth", (*greeting("003.008", "003.008", u8(2)), Us(u8(2)), *AUTH, OK),
         logged_in("3.8", "VncAuth")),
    Case("Apple 3.889 is 3.8", (*greeting("003.889", "003.008", u8(2)), Us(u8(2)), *AUTH, OK),
         logged_in("3.8", "VncAuth")),
    Case("4.001 is 3.8", (*greeting("004.001", "003.008", u8(2)), Us(u8(2)), *AUTH, OK),
         logged_in("3.8", "VncAuth")),
    Case("3.8 ServerInit in the same read is leftover",
         (*greeting("003.008", "003.008", u8(2)), Us(u8(2)), *AUTH, OK),
         logged_in("3.8", "VncAuth"), after=SERVER_INIT),
    Case("3.3 None: ServerInit leftover", (VM(version("003.003")), Us(version("003.003")),
                                           VM(u32(1))),
         logged_in("3.3", "None"), after=SERVER_INIT),
    Case("VncAuth preferred to None", (*greeting("003.008", "003.008", u8(1, 2)), Us(u8(2)),
                                       *AUTH, OK),
         logged_in("3.8", "VncAuth")),
    Case("None without a password", (*greeting("003.008", "003.008", u8(2, 1)), Us(u8(1)), OK),
         logged_in("3.8", "None"), password=None),
    Case("an empty password is none", (*greeting("003.008", "003.008", u8(2, 1)), Us(u8(1)), OK),
         logged_in("3.8", "None"), password=""),
    Case("unknown types skipped", (*greeting("003.008", "003.008", u8(5, 16, 2, 30)), Us(u8(2)),
                                   *AUTH, OK),
         logged_in("3.8", "VncAuth")),
    Case("VeNCrypt preferred to VncAuth", (*vencrypt([258], 258, types=u8(2, 1, 19)), VM(u8(1)),
                                            TLS(False), *AUTH, OK),
         logged_in("3.8", "VeNCrypt/TLSVnc")),
    Case("VncAuth preferred to VeNCrypt without TLS",
         (*greeting("003.008", "003.008", u8(19, 2)), Us(u8(2)), *AUTH, OK),
         logged_in("3.8", "VncAuth"), tls_possible=False),
    Case("None preferred to VeNCrypt without TLS",
         (*greeting("003.008", "003.008", u8(19, 1)), Us(u8(1)), OK),
         logged_in("3.8", "None"), password=None, tls_possible=False),
    Case("VeNCrypt alone without TLS: VncAuth subtype",
         (*vencrypt([258, 2], 2), *AUTH, OK), logged_in("3.8", "VeNCrypt/VncAuth"),
         tls_possible=False),
    Case("VeNCrypt 0.3 answered with 0.2",
         (*greeting("003.008", "003.008", u8(19)), Us(u8(19)), VM(u8(0, 3)), Us(u8(0, 2)),
          VM(u8(0, 1) + u32(2)), Us(u32(2)), *AUTH, OK),
         logged_in("3.8", "VeNCrypt/VncAuth")),
    Case("VeNCrypt under 3.7", (*vencrypt([2], 2, "003.007"), *AUTH, OK),
         logged_in("3.7", "VeNCrypt/VncAuth")),
    Case("VeNCrypt None under 3.7 has a SecurityResult", (*vencrypt([1], 1, "003.007"), OK),
         logged_in("3.7", "VeNCrypt/None")),
    # Each subtype alone.
    Case("TLSNone", (*vencrypt([257], 257), VM(u8(1)), TLS(False), OK),
         logged_in("3.8", "VeNCrypt/TLSNone")),
    Case("TLSVnc", (*vencrypt([258], 258), VM(u8(1)), TLS(False), *AUTH, OK),
         logged_in("3.8", "VeNCrypt/TLSVnc")),
    Case("TLSPlain", (*vencrypt([259], 259), VM(u8(1)), TLS(False), Us(plain(USER, PASSWORD)), OK),
         logged_in("3.8", "VeNCrypt/TLSPlain")),
    Case("X509None", (*vencrypt([260], 260), VM(u8(1)), TLS(True), OK),
         logged_in("3.8", "VeNCrypt/X509None")),
    Case("X509Vnc", (*vencrypt([261], 261), VM(u8(1)), TLS(True), *AUTH, OK),
         logged_in("3.8", "VeNCrypt/X509Vnc")),
    Case("X509Plain", (*vencrypt([262], 262), VM(u8(1)), TLS(True), Us(plain(USER, PASSWORD)),
                       OK),
         logged_in("3.8", "VeNCrypt/X509Plain")),
    Case("X509Plain: any nonzero go-ahead", (*vencrypt([262], 262), VM(u8(7)), TLS(True),
                                             Us(plain(USER, PASSWORD)), OK),
         logged_in("3.8", "VeNCrypt/X509Plain")),
    Case("VeNCrypt None", (*vencrypt([1], 1), OK), logged_in("3.8", "VeNCrypt/None")),
    Case("VeNCrypt VncAuth", (*vencrypt([2], 2), *AUTH, OK), logged_in("3.8", "VeNCrypt/VncAuth")),
    Case("VeNCrypt Plain", (*vencrypt([256], 256), Us(plain(USER, PASSWORD)), OK),
         logged_in("3.8", "VeNCrypt/Plain")),
    Case("Plain credentials in UTF-8", (*vencrypt([256], 256), Us(plain("jörg", "pässwörd€")), OK),
         logged_in("3.8", "VeNCrypt/Plain"), username="jörg", password="pässwörd€"),
    # The preference among subtypes.
    Case("X509Plain first", (*vencrypt(ALL := [1, 2, 256, 257, 258, 259, 260, 261, 262], 262),
                             VM(u8(1)), TLS(True), Us(plain(USER, PASSWORD)), OK),
         logged_in("3.8", "VeNCrypt/X509Plain")),
    Case("X509Vnc without a user", (*vencrypt(ALL, 261), VM(u8(1)), TLS(True), *AUTH, OK),
         logged_in("3.8", "VeNCrypt/X509Vnc"), username=None),
    Case("TLSPlain before TLSVnc", (*vencrypt([1, 258, 259], 259), VM(u8(1)), TLS(False),
                                    Us(plain(USER, PASSWORD)), OK),
         logged_in("3.8", "VeNCrypt/TLSPlain")),
    Case("X509None without credentials", (*vencrypt(ALL, 260), VM(u8(1)), TLS(True), OK),
         logged_in("3.8", "VeNCrypt/X509None"), username=None, password=None),
    Case("TLSNone without credentials", (*vencrypt([1, 2, 256, 257, 258], 257), VM(u8(1)),
                                               TLS(False), OK),
         logged_in("3.8", "VeNCrypt/TLSNone"), username=None, password=None),
    Case("TLSNone before cleartext Plain", (*vencrypt([256, 257], 257), VM(u8(1)), TLS(False), OK),
         logged_in("3.8", "VeNCrypt/TLSNone")),
    Case("VncAuth subtype without TLS", (*vencrypt(ALL, 2), *AUTH, OK),
         logged_in("3.8", "VeNCrypt/VncAuth"), tls_possible=False),
    Case("None subtype without TLS or password", (*vencrypt(ALL, 1), OK),
         logged_in("3.8", "VeNCrypt/None"), password=None, tls_possible=False),
    Case("None subtype before cleartext Plain", (*vencrypt([256, 1], 1), OK),
         logged_in("3.8", "VeNCrypt/None"), tls_possible=False),
    Case("Plain last, without TLS", (*vencrypt([256, 258, 261], 256), Us(plain(USER, PASSWORD)),
                                     OK),
         logged_in("3.8", "VeNCrypt/Plain"), tls_possible=False),
    Case("unknown subtypes skipped", (*vencrypt([99, 19, 258, 70000], 258), VM(u8(1)),
                                      TLS(False), *AUTH, OK),
         logged_in("3.8", "VeNCrypt/TLSVnc")),
]

REFUSED = failed(Refusal.VM_CREDENTIALS_REFUSED, "security result 1")

FAILURES = [
    Case("SSH banner", (VM(b"S"),),
         failed(Refusal.VM_NOT_RFB, "not an RFB version line: b'S'"),
         after=b"SH-2.0-OpenSSH_9.6\r\n"),
    Case("HTTP", (VM(b"H"),), failed(Refusal.VM_NOT_RFB, "not an RFB version line: b'H'"),
         after=b"TTP/1.1 400 Bad Request\r\n"),
    Case("version too short", (VM(b"RFB 003.8\n"),),
         failed(Refusal.VM_NOT_RFB, r"not an RFB version line: b'RFB 003.8\n'")),
    Case("version with CRLF", (VM(b"RFB 003.008\r"),),
         failed(Refusal.VM_NOT_RFB, r"not an RFB version line: b'RFB 003.008\r'")),
    Case("lower-case banner", (VM(b"rfb"[:1]),),
         failed(Refusal.VM_NOT_RFB, "not an RFB version line: b'r'")),
    Case("version 2.2", (VM(version("002.002")),),
         failed(Refusal.VM_NOT_RFB, "RFB version 2.2 is too old")),
    Case("UltraVNC repeater 0.0", (VM(version("000.000")),),
         failed(Refusal.VM_NOT_RFB, "RFB version 0.0 is too old")),
    Case("3.3 type 0 with reason",
         (VM(version("003.003")), Us(version("003.003")), VM(u32(0) + reason(b"Too many"))),
         failed(Refusal.VM_REFUSED, "the VM refused the connection: Too many")),
    Case("3.8 no types, with reason",
         (*greeting("003.008", "003.008", b""), VM(reason(b"Host blacklisted"))),
         failed(Refusal.VM_REFUSED, "the VM offers no security type: Host blacklisted")),
    Case("3.7 no types, empty reason", (*greeting("003.007", "003.007", b""), VM(reason(b""))),
         failed(Refusal.VM_REFUSED, "the VM offers no security type")),
    Case("reason of the largest size", (*greeting("003.008", "003.008", b""),
                                        VM(reason(b"x" * MAX_REASON))),
         failed(Refusal.VM_REFUSED, "the VM offers no security type: " + "x" * MAX_REASON)),
    Case("oversize reason", (*greeting("003.008", "003.008", b""), VM(u32(MAX_REASON + 1))),
         failed(Refusal.VM_NOT_RFB, "the VM offers no security type: a reason of 4097 bytes "
                                    "is not RFB")),
    Case("huge reason", (*greeting("003.008", "003.008", b""), VM(u32(2**32 - 1))),
         failed(Refusal.VM_NOT_RFB, "the VM offers no security type: a reason of 4294967295 "
                                    "bytes is not RFB")),
    Case("reason escaped for the log", (*greeting("003.008", "003.008", b""),
                                        VM(reason(b"line\nforged\x1b[31m"))),
         failed(Refusal.VM_REFUSED, r"the VM offers no security type: line\x0aforged\x1b[31m")),
    Case("reason in latin-1", (*greeting("003.008", "003.008", b""), VM(reason(b"caf\xe9"))),
         failed(Refusal.VM_REFUSED, "the VM offers no security type: café")),
    Case("reason echoing the secrets is redacted",
         (*greeting("003.008", "003.008", b""),
          VM(reason(f"user {USER} password {PASSWORD}".encode()))),
         failed(Refusal.VM_REFUSED, "the VM offers no security type: user *** password ***")),
    Case("3.3 unknown type", (VM(version("003.003")), Us(version("003.003")), VM(u32(19))),
         failed(Refusal.VM_NO_SECURITY_TYPE, "RFB 3.3 security type 19 is not supported")),
    Case("3.3 VncAuth without password",
         (VM(version("003.003")), Us(version("003.003")), VM(u32(2))),
         failed(Refusal.VM_NO_SECURITY_TYPE,
                "the VM asks for VncAuth and no password is configured"),
         password=None),
    Case("VncAuth without password", (*greeting("003.008", "003.008", u8(2)),),
         failed(Refusal.VM_NO_SECURITY_TYPE, "offered: [2]; usable here: no credentials, TLS"),
         password=None),
    Case("only unknown types", (*greeting("003.008", "003.008", u8(5, 16, 30)),),
         failed(Refusal.VM_NO_SECURITY_TYPE,
                "offered: [5, 16, 30]; usable here: user name and password, TLS")),
    Case("VeNCrypt 0.1", (*greeting("003.008", "003.008", u8(19)), Us(u8(19)), VM(u8(0, 1))),
         failed(Refusal.VM_NO_SECURITY_TYPE, "VeNCrypt version 0.1 is not supported")),
    Case("VeNCrypt status refused", (*greeting("003.008", "003.008", u8(19)), Us(u8(19)),
                                     VM(u8(0, 2)), Us(u8(0, 2)), VM(u8(1))),
         failed(Refusal.VM_NO_SECURITY_TYPE, "the VM refused VeNCrypt 0.2 (status 1)")),
    Case("VeNCrypt no subtypes", (*greeting("003.008", "003.008", u8(19)), Us(u8(19)),
                                  VM(u8(0, 2)), Us(u8(0, 2)), VM(u8(0, 0))),
         failed(Refusal.VM_NO_SECURITY_TYPE, "the VM offers no VeNCrypt subtype")),
    Case("VeNCrypt Plain subtypes without a user", (*vencrypt([262, 259, 256], 0)[:-1],),
         failed(Refusal.VM_NO_SECURITY_TYPE,
                "VeNCrypt subtypes offered: X509Plain(262), TLSPlain(259), Plain(256); "
                "usable here: password, TLS"),
         username=None),
    Case("VeNCrypt TLS subtypes without TLS", (*vencrypt([258, 261, 99], 0)[:-1],),
         failed(Refusal.VM_NO_SECURITY_TYPE,
                "VeNCrypt subtypes offered: TLSVnc(258), X509Vnc(261), ?(99); "
                "usable here: user name and password, no TLS"),
         tls_possible=False),
    Case("TLS go-ahead 0", (*vencrypt([261], 261), VM(u8(0))),
         failed(Refusal.VM_NO_SECURITY_TYPE, "the VM could not start TLS for X509Vnc")),
    Case("3.8 refused with reason", (*greeting("003.008", "003.008", u8(2)), Us(u8(2)), *AUTH,
                                     VM(u32(1) + reason(b"Authentication failure"))),
         failed(Refusal.VM_CREDENTIALS_REFUSED, "security result 1: Authentication failure")),
    Case("3.8 refused, empty reason", (*greeting("003.008", "003.008", u8(2)), Us(u8(2)), *AUTH,
                                       VM(u32(1) + reason(b""))),
         REFUSED),
    Case("3.8 too many tries", (*greeting("003.008", "003.008", u8(2)), Us(u8(2)), *AUTH,
                                VM(u32(2) + reason(b"Too many security failures"))),
         failed(Refusal.VM_CREDENTIALS_REFUSED, "security result 2: Too many security failures")),
    Case("3.8 None refused", (*greeting("003.008", "003.008", u8(1)), Us(u8(1)),
                              VM(u32(1) + reason(b"no"))),
         failed(Refusal.VM_CREDENTIALS_REFUSED, "security result 1: no")),
    Case("3.8 oversize result reason", (*greeting("003.008", "003.008", u8(2)), Us(u8(2)), *AUTH,
                                        VM(u32(1, MAX_REASON + 1))),
         failed(Refusal.VM_NOT_RFB,
                "security result 1: a reason of 4097 bytes is not RFB")),
    Case("3.7 refused, no reason", (*greeting("003.007", "003.007", u8(2)), Us(u8(2)), *AUTH,
                                    VM(u32(1))),
         REFUSED),
    Case("3.3 refused, no reason", (VM(version("003.003")), Us(version("003.003")), VM(u32(2)),
                                    *AUTH, VM(u32(1))),
         REFUSED),
    Case("VeNCrypt under 3.7 refused, no reason", (*vencrypt([2], 2, "003.007"), *AUTH,
                                                   VM(u32(1))),
         REFUSED),
    Case("TLSPlain refused with reason", (*vencrypt([259], 259), VM(u8(1)), TLS(False),
                                          Us(plain(USER, PASSWORD)),
                                          VM(u32(1) + reason(b"Bad user name or password"))),
         failed(Refusal.VM_CREDENTIALS_REFUSED, "security result 1: Bad user name or password")),
]

CASES = SUCCESSES + FAILURES


def play(case: Case, cuts: Iterable[int] = ()) -> list[tuple[int, int, Action]]:
    """Feed the case's VM bytes to a fresh login, cut at the global offsets ``cuts`` (and where
    TLS starts); each action with its segment and the bytes of that segment fed up to it.
    Bytes not fed after LoggedIn are added to its leftover, as the driver would relay them."""
    machine = case.machine()
    played: list[tuple[int, int, Action]] = []
    start = 0
    for index, segment in enumerate(case.segments()):
        inner = {cut - start for cut in cuts if start < cut < start + len(segment)}
        bounds = sorted({0, len(segment)} | inner)
        start += len(segment)
        chunks = [segment[a:b] for a, b in itertools.pairwise(bounds)]
        if index > 0:
            assert isinstance(played[-1][2], StartTLS), "the VM sent on after TLS started"
            played += [(index, 0, action) for action in machine.tls_started()]
        fed = 0
        for position, chunk in enumerate(chunks):
            fed += len(chunk)
            for action in machine.receive(chunk):
                if isinstance(action, LoggedIn):
                    rest = b"".join(chunks[position + 1:])
                    played.append((index, fed - len(action.leftover),
                                   attrs.evolve(action, leftover=action.leftover + rest)))
                else:
                    played.append((index, fed, action))
            if played and isinstance(played[-1][2], LoggedIn | Failed):
                assert_secret_free(machine, actions_of(played))
                return played
    assert_secret_free(machine, actions_of(played))
    return played


def assert_secret_free(machine: VMLogin, actions: list[Action]) -> None:
    """Neither secret is in the machine's repr nor in any action's (Plain's Send bytes hold
    them, and a Send's repr shows only their length)."""
    for text in [repr(machine), *map(repr, actions)]:
        assert PASSWORD not in text
        assert USER not in text


def actions_of(played: list[tuple[int, int, Action]]) -> list[Action]:
    return [action for _, _, action in played]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_whole(case):
    """Each segment of the VM's bytes in one read gives the script's actions."""
    assert actions_of(play(case)) == actions_of(case.expected())


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_byte_by_byte(case):
    """One byte at a time, each action comes exactly with the byte that prompts it."""
    everything = sum(len(segment) for segment in case.segments())
    assert play(case, range(everything)) == case.expected()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_split(case):
    """Cut in two at every offset, the actions are those of the script."""
    everything = sum(len(segment) for segment in case.segments())
    expected = actions_of(case.expected())
    for cut in range(1, everything):
        assert actions_of(play(case, [cut])) == expected, cut


@given(st.data())
def test_random_cuts(data):
    """Cut anywhere, any number of times, the actions are those of the script."""
    case = data.draw(st.sampled_from(CASES))
    everything = sum(len(segment) for segment in case.segments())
    cuts = data.draw(st.sets(st.integers(1, max(1, everything - 1))))
    assert actions_of(play(case, cuts)) == actions_of(case.expected())


def test_secrets_never_in_a_failure():
    """No failure's detail names the password or the user name, whatever the VM says."""
    for case in FAILURES:
        for action in actions_of(play(case)):
            if isinstance(action, Failed):
                assert PASSWORD not in action.detail
                assert USER not in action.detail


def test_repr_hides_the_secrets():
    """The login's repr shows neither secret, only its settings and stage."""
    machine = VMLogin(password=PASSWORD, username=USER)
    assert PASSWORD not in repr(machine)
    assert USER not in repr(machine)
    assert "tls_possible=True" in repr(machine)


def test_plain_send_repr_shows_only_a_length():
    """The Send that carries Plain's credentials does not print them."""
    case = next(case for case in CASES if case.name == "VeNCrypt Plain")
    sends = [action for action in actions_of(play(case)) if isinstance(action, Send)]
    assert any(PASSWORD.encode() in send.data for send in sends)
    assert all(PASSWORD not in repr(send) for send in sends)


def test_serverinit_leftover_in_one_read():
    """ServerInit read with the SecurityResult comes out whole as the leftover."""
    machine = VMLogin(password=PASSWORD, username=None)
    machine.receive(version("003.008"))
    machine.receive(u8(1, 2))
    machine.receive(CHALLENGE)
    assert machine.receive(u32(0) + SERVER_INIT) == [LoggedIn("3.8", "VncAuth", SERVER_INIT)]


def test_receive_after_logged_in_raises():
    """After LoggedIn the VM's bytes are the relay's: handing them here is a driver's bug."""
    machine = VMLogin(password=None, username=None)
    machine.receive(version("003.003") + u32(1))
    with pytest.raises(RuntimeError, match="relay"):
        machine.receive(b"\x01")


def test_receive_after_failed_is_ignored():
    """After Failed, bytes still arriving from the closing VM change nothing."""
    machine = VMLogin(password=None, username=None)
    assert isinstance(machine.receive(b"SSH-2.0-OpenSSH_9.6\r\n")[0], Failed)
    assert machine.receive(b"more") == []
    assert machine.connection_lost() == []


def test_tls_started_unasked_raises():
    """tls_started() when no TLS was asked for is a driver's bug."""
    machine = VMLogin(password=PASSWORD, username=None)
    with pytest.raises(RuntimeError, match="no TLS"):
        machine.tls_started()
    machine.receive(version("003.008"))
    with pytest.raises(RuntimeError, match="no TLS"):
        machine.tls_started()


def test_clear_bytes_after_tls_go_ahead_in_the_same_read():
    """Bytes the VM sends after its TLS go-ahead, before any TLS, are not RFB."""
    case = next(case for case in CASES if case.name == "TLSVnc")
    machine = case.machine()
    actions = machine.receive(case.segments()[0] + b"junk")
    clear = Failed(Refusal.VM_NOT_RFB, "the VM sent bytes in clear after its TLS go-ahead")
    assert actions[-2:] == [StartTLS(False), clear]
    assert machine.receive(b"x") == []


def test_clear_bytes_after_tls_go_ahead_in_a_later_read():
    """The same bytes in a read of their own fail the same way."""
    case = next(case for case in CASES if case.name == "TLSVnc")
    machine = case.machine()
    assert machine.receive(case.segments()[0])[-1] == StartTLS(False)
    clear = Failed(Refusal.VM_NOT_RFB, "the VM sent bytes in clear after its TLS go-ahead")
    assert machine.receive(b"junk") == [clear]
    with pytest.raises(RuntimeError):
        machine.tls_started()


def test_whole_banner_fails_like_its_first_byte():
    """A full SSH banner gives the same failure as its first byte alone."""
    machine = VMLogin(password=PASSWORD, username=USER)
    assert machine.receive(b"SSH-2.0-OpenSSH_9.6\r\n") == [
        Failed(Refusal.VM_NOT_RFB, "not an RFB version line: b'S'")]


@pytest.mark.parametrize(("sent", "stage"), [
    (b"", "version"),
    (b"RFB 003.0", "version"),
    (version("003.008"), "security types"),
    (version("003.008") + u8(1, 2), "VncAuth challenge"),
    (version("003.008") + u8(1, 2) + CHALLENGE, "security result"),
    (version("003.008") + u8(1, 19) + u8(0, 2), "VeNCrypt version"),
    (version("003.008") + u8(1, 19) + u8(0, 2, 0, 1), "VeNCrypt subtypes"),
    (version("003.008") + u8(1, 19) + u8(0, 2, 0, 1) + u32(258), "TLS go-ahead"),
])
def test_connection_lost_mid_handshake(sent, stage):
    """The VM closing mid-handshake is VM_LOST, naming the stage for the log."""
    machine = VMLogin(password=PASSWORD, username=None)
    machine.receive(sent)
    assert machine.stage == stage
    assert machine.connection_lost() == [Failed(Refusal.VM_LOST, f"the VM closed during {stage}")]
    assert machine.receive(b"late") == []


def test_connection_lost_while_awaiting_tls():
    """The VM closing during the TLS handshake is VM_LOST during TLS."""
    case = next(case for case in CASES if case.name == "X509Vnc")
    machine = case.machine()
    machine.receive(case.segments()[0])
    assert machine.connection_lost() == [Failed(Refusal.VM_LOST, "the VM closed during TLS")]


@pytest.mark.parametrize(("sent", "refusal"), [
    (version("003.008") + u8(0), Refusal.VM_REFUSED),
    (version("003.003") + u32(0) + u32(10) + b"Too", Refusal.VM_REFUSED),
    (version("003.008") + u8(1, 2) + CHALLENGE + u32(1), Refusal.VM_CREDENTIALS_REFUSED),
    (version("003.008") + u8(1, 2) + CHALLENGE + u32(1, 20) + b"Auth",
     Refusal.VM_CREDENTIALS_REFUSED),
])
def test_connection_lost_before_the_reason(sent, refusal):
    """A VM that fails and closes before its reason is still that failure."""
    machine = VMLogin(password=PASSWORD, username=None)
    machine.receive(sent)
    assert machine.connection_lost() == [Failed(refusal, "the VM closed before its reason")]


def test_connection_lost_after_logged_in():
    """Once logged in, the connection's end is the relay's business."""
    machine = VMLogin(password=None, username=None)
    machine.receive(version("003.003") + u32(1))
    assert machine.connection_lost() == []


def test_against_the_browser_greeting():
    """The login and the proxy's own greeting, wired back to back, agree on 3.8 and None."""
    login, greeter = VMLogin(password=None, username=None), BrowserGreeting()
    ends: list[object] = []
    to_login = [greeter.start()]
    for _ in range(10):
        to_greeter = []
        for data in to_login:
            for action in login.receive(data):
                (to_greeter.append(action.data) if isinstance(action, Send)
                 else ends.append(action))
        to_login = []
        for data in to_greeter:
            for action in greeter.receive(data):
                (to_login.append(action.data) if isinstance(action, Send)
                 else ends.append(action))
        if not to_login:
            break
    assert ends == [Greeted("3.8", b""), LoggedIn("3.8", "None", b"")]
