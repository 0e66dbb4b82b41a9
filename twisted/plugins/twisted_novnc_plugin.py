"""twistd plugin stub: nothing heavy is imported until ``twistd novnc`` runs."""

from twisted.application.service import ServiceMaker

novnc = ServiceMaker(
    "twisted_novnc",
    "twisted_novnc.tap",
    "Session-routing WebSocket proxy for noVNC, gated on PostgreSQL readiness.",
    "novnc",
)
