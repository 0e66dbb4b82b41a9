"""The proxy logs in to the VM's VNC server before the browser's WebSocket opens.

:class:`~twisted_novnc.vnc.vm_login.VMLogin` decides every byte; this drives it on a connected
upstream (either kind: raw TCP or a WebSocket to a websockify on the VM).  The upstream
delivers the VM's bytes here until the login is over, then holds them for the relay, which
greets the browser (:class:`~twisted_novnc.vnc.browser_greeting.BrowserGreeting`) before any
byte passes.  VeNCrypt's TLS starts on the same TCP connection (``ITLSTransport.startTLS``),
so a WebSocket upstream never chooses a TLS scheme.

Every failure is a :class:`Refused` with its own close code (4520-4523, the refusal table),
logged once by the request path and never retried: a wrong password would only lock the
account on VNC servers that count failures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.relay.upstream import UPSTREAM_TCP, tls_options, tls_trust
from twisted_novnc.session import Target, VNCCredentials
from twisted_novnc.vnc.vm_login import Failed, LoggedIn, Send, StartTLS, VMLogin

_log = Logger()

#: What ``twisted_novnc_vm_logins_total{result}`` counts, by refusal.
LOGIN_RESULTS = {
    Refusal.VM_CREDENTIALS_REFUSED: "credentials_refused",
    Refusal.VM_NO_SECURITY_TYPE: "no_security_type",
    Refusal.VM_NOT_RFB: "not_rfb",
    Refusal.VM_REFUSED: "refused",
}


@implementer(IOpenSSLClientConnectionCreator)
class AnonymousTLS:
    """TLS without certificates (VeNCrypt's TLSNone, TLSVnc, TLSPlain): anonymous
    Diffie-Hellman, which TLS 1.3 does not have and OpenSSL allows only at security level 0.
    It encrypts but authenticates no one: the X509 schemes are the ones that do."""

    def __init__(self) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(b"aNULL:!eNULL:@SECLEVEL=0")
        context.set_verify(SSL.VERIFY_NONE)
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


@attrs.frozen
class VeNCryptTLS:
    """How VeNCrypt's TLS is started: anonymously, or against the VM's certificate
    (``x509(host)``: checked against ``[upstream] ca_file`` when one is set)."""

    anonymous: Any
    x509: Callable[[str], Any]


@attrs.define(eq=False)
class _Login:
    """One login: the machine, the upstream it reads from, and the Deferred of the result."""

    upstream: Any
    machine: VMLogin
    target: Target
    tls: VeNCryptTLS | None
    result: Deferred[Any] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.result = Deferred(self._cancel)

    def start(self) -> Deferred[Any]:
        self.upstream.attach(self)
        return self.result

    # what the upstream calls, as it would a relay
    def from_vm(self, data: bytes) -> None:
        if not self.result.called:
            self._act(self.machine.receive(bytes(data)))

    def vm_gone(self, clean: bool) -> None:
        lost = getattr(self.upstream, "lost_reason", None)
        why = f": {lost.getErrorMessage()}" if lost is not None and not clean else ""
        for action in self.machine.connection_lost():
            if isinstance(action, Failed):
                self._fail(Refused(action.refusal, f"{action.detail} (the RFB opening){why}"))
        self._fail(Refused(Refusal.VM_LOST, f"closed during the RFB opening{why}"))

    # the machine's actions
    def _act(self, actions: list[Any]) -> None:
        for action in actions:
            if self.result.called:
                return
            if isinstance(action, Send):
                self.upstream.send(action.data)
            elif isinstance(action, StartTLS):
                assert self.tls is not None  # the machine asks only when told it may
                creator = self.tls.x509(self.target.host) if action.verify else self.tls.anonymous
                self.upstream.start_tls(creator, self._tls_started)
            elif isinstance(action, LoggedIn):
                self._logged_in(action)
            elif isinstance(action, Failed):
                self._fail(Refused(action.refusal, action.detail))

    def _tls_started(self) -> None:
        if not self.result.called:
            self._act(self.machine.tls_started())

    def _logged_in(self, done: LoggedIn) -> None:
        self.upstream.detach(done.leftover)
        self.upstream.login = done
        self.result.callback(self.upstream)

    def _fail(self, refused: Refused) -> None:
        if self.result.called:
            return
        self.upstream.detach(b"")
        self.upstream.close(1000, "login failed")
        self.result.errback(refused)

    def _cancel(self, _: Deferred[Any]) -> None:
        self.upstream.detach(b"")
        self.upstream.close(1000, "cancelled")


def log_in(
    upstream: Any,
    credentials: VNCCredentials,
    target: Target,
    clock: IReactorTime,
    timeout: float,
    tls: VeNCryptTLS | None,
) -> Deferred[Any]:
    """Log in to the VM on ``upstream``; fires with it once the VM has said the login
    succeeded (``upstream.login`` says how), or fails with :class:`Refused`.

    ``tls`` is None when the upstream cannot start TLS.  Bounded by ``timeout``: a VM that does
    not finish its part in time is not speaking RFB (4522).
    """
    machine = VMLogin(credentials.password, credentials.username, tls_possible=tls is not None)
    login = _Login(upstream, machine, target, tls)
    d = login.start()

    def timed_out(failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError):
            return Failure(Refused(
                Refusal.VM_NOT_RFB,
                f"no RFB opening within {timeout:g}s (at {login.machine.stage})",
            ))
        return failure

    return d.addTimeout(timeout, clock).addErrback(timed_out)


def vencrypt_tls(ca_file: str) -> VeNCryptTLS:
    """VeNCrypt's TLS: the X509 schemes check the VM's certificate against ``ca_file`` (and
    its address) when one is set, and only encrypt otherwise."""
    trust = tls_trust("verify", ca_file) if ca_file else None
    mode = "verify" if ca_file else "on"
    return VeNCryptTLS(AnonymousTLS(), lambda host: tls_options(mode, trust, host))


Connector = Callable[[Target, float, str, str], Deferred[Any]]


def with_login(
    connect: Connector,
    clock: IReactorTime,
    timeout: float,
    shared: VNCCredentials | None,
    tls: VeNCryptTLS,
    counted: Callable[[str], None],
) -> Connector:
    """``connect``, then a login with the session's credentials (a row's password wins over
    ``shared``, ``[vnc] password_file``'s).  ``counted`` is told each login's result."""
    def connect_and_log_in(target: Target, time_left: float, suffix: str, query: str) -> Any:
        def connected(upstream: Any) -> Deferred[Any]:
            credentials = (target.credentials or VNCCredentials()).or_else(shared)
            can_tls = tls if upstream.kind == UPSTREAM_TCP else None
            d = log_in(upstream, credentials, target, clock, timeout, can_tls)
            d.addCallbacks(logged_in, failed)
            return d

        def logged_in(upstream: Any) -> Any:
            counted("ok")
            _log.info(
                "logged in to the VM of {session_id} with {security} (RFB {version})",
                event="vm_logged_in", session_id=target.session_id,
                security=upstream.login.security, version=upstream.login.version,
            )
            return upstream

        def failed(failure: Failure) -> Failure:
            if failure.check(Refused):
                refusal = failure.value.refusal
                counted(LOGIN_RESULTS.get(refusal, "lost"))
            return failure

        return connect(target, time_left, suffix, query).addCallback(connected)

    return connect_and_log_in
