import RFB from '@novnc/novnc';

// Open the desktop of `sessionId` in the element `screen` at once, without waiting for
// the VM: the proxy holds the connection until the backend commits the VM's address.
// `proxy` is its WebSocket origin, e.g. 'wss://proxy.example.com'.  The close code comes
// from the WebSocket handed to RFB: noVNC's own "disconnect" event carries none.
export function openDesktop(screen, proxy, sessionId, token, showWhy) {
    const url = `${proxy}/websockify/${encodeURIComponent(sessionId)}`
        + (token ? `?token=${encodeURIComponent(token)}` : '');
    const ws = new WebSocket(url, ['binary']);
    ws.addEventListener('close', (e) => showWhy(e.code, e.reason));
    return new RFB(screen, ws);
}
