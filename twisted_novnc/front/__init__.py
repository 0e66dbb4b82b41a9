"""The browser side: the WebSocket protocol, the request checks, tokens, origins and paths."""
