"""twisted_novnc: a session-routing WebSocket proxy for noVNC."""

__version__ = "0.1.0"
