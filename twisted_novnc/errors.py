"""The refusal table: every way a request can fail, with its close code and HTTP status.

Browsers cannot read the HTTP status of a refused WebSocket handshake (they report 1006), so
by default the proxy completes the handshake and closes at once with ``4000 + status``.  This
table is the one place that maps a reason to both forms.
"""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    """Why a browser's connection was refused or ended, as (close code, HTTP status, reason)."""

    BAD_PATH = (4400, 400, "bad path")
    BAD_REQUEST = (4400, 400, "bad request")
    BAD_SUBPROTOCOL = (4400, 400, "subprotocol binary required")
    UNAUTHORIZED = (4401, 401, "unauthorized")
    TOKEN_REQUIRED = (4401, 401, "token required")
    TOKEN_EXPIRED = (4401, 401, "token expired")
    FORBIDDEN = (4403, 403, "forbidden")
    NOT_FOUND = (4404, 404, "no such session")
    ENDED = (4410, 410, "session ended")
    MOVED = (4410, 410, "session moved")
    EXPIRED = (4410, 410, "session expired")
    TOO_MANY = (4429, 429, "too many connections")
    IDLE = (4408, 408, "idle timeout")
    TOKEN_USED = (4403, 403, "token already used")
    TARGET_FORBIDDEN = (4403, 403, "VM address not allowed")
    ORIGIN_FORBIDDEN = (4403, 403, "origin not allowed")
    VM_UNREACHABLE = (4502, 502, "VM unreachable")
    VM_LOST = (4502, 502, "VM connection lost")
    # A name is never resolved: to the allowlist it is an address outside every network.
    BAD_VM_ADDRESS = (4403, 403, "bad VM address")
    DATABASE_UNAVAILABLE = (4503, 503, "database unavailable")
    SHUTTING_DOWN = (4503, 503, "shutting down")
    # This process has no descriptor left for the VM's socket: its limit, not the VM's fault.
    AT_CAPACITY = (4503, 503, "proxy at capacity")
    NOT_READY = (4504, 504, "session not ready in time")
    # The RFB handshakes the proxy speaks when it holds the VM's credentials (twisted_novnc.vnc).
    VM_CREDENTIALS_REFUSED = (4520, 502, "VM refused the credentials")
    VM_NO_SECURITY_TYPE = (4521, 502, "VM offers no supported security type")
    VM_NOT_RFB = (4522, 502, "VM does not speak RFB")
    # An RFB failure before authentication (no security types, or 3.3's type 0), with the VM's
    # reason in the log.
    VM_REFUSED = (4523, 502, "VM refused the connection")
    # The browser's side broke the RFB protocol.
    BAD_RFB = (4400, 400, "bad RFB handshake")

    @property
    def close_code(self) -> int:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]

    @property
    def reason(self) -> str:
        return self.value[2]


class Refused(Exception):
    """A request that cannot be served; ``detail`` goes to the log, never to the browser."""

    def __init__(self, refusal: Refusal, detail: str = "") -> None:
        super().__init__(refusal, detail)
        self.refusal = refusal
        self.detail = detail

    def __str__(self) -> str:
        text = f"{self.refusal.close_code} {self.refusal.reason}"
        return f"{text}: {self.detail}" if self.detail else text
