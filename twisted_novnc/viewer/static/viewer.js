// The viewer page's one module: the vendored noVNC client on the WebSocket URL of [novnc] path.
//
// The page is http(s)://HOST:PORT/vnc/<session_id>?token=...; the session id and the token come
// from that URL and nowhere else, and go to the proxy on its own host (ws:// or wss:// as the
// page was loaded).  While the proxy holds the browser (the session's VM is not committed yet)
// the page says "Waiting for your desktop…" with the seconds elapsed.  The close code is read
// from the WebSocket handed to RFB (noVNC's own "disconnect" event carries none) and shown in
// words; after 1001 (the proxy is restarting) and 4503 (unavailable for now) the page
// reconnects, with a bounded backoff.
import RFB from './novnc/core/rfb.js';

// Every close code of twisted_novnc's refusal table (twisted_novnc/errors.py), and those the
// WebSocket layer uses, in words for the person in front of the screen.  tests/test_viewer.py
// checks that every code of the table has its message here.
export const MESSAGES = {
    1000: 'The session has ended.',
    1001: 'The service is restarting.',
    1003: 'The browser sent data the service does not accept.',
    1005: 'The connection was closed.',
    1006: 'The connection to the service failed or was lost.',
    1009: 'The browser sent a message that is too large.',
    4400: 'This link is not valid.',
    4401: 'This link needs a valid access token (it may have expired). '
        + 'Open your desktop again from where you started.',
    4403: 'You are not allowed to open this desktop from here (or this link was used already).',
    4404: 'There is no such session. Start a new one from where you started.',
    4408: 'You were disconnected after a long time without activity.',
    4410: 'This session has ended.',
    4429: 'Too many connections. Close other tabs showing this desktop and try again later.',
    4502: 'Your desktop cannot be reached. It may have stopped: try again, or start a new session.',
    4503: 'The service is unavailable for a moment.',
    4504: 'Your desktop did not start in time. Try again in a moment.',
    4520: 'Your desktop refused the service\'s login.',
    4521: 'Your desktop offers no way to log in that the service supports.',
    4522: 'Your desktop did not answer as a VNC server.',
    4523: 'Your desktop refused the connection.',
};

// After these the page reconnects by itself; while it does, a failed attempt (1006: the
// proxy is not listening yet) is retried too, up to MAX_ATTEMPTS in a row.
const RECONNECT = new Set([1001, 4503]);
const MAX_ATTEMPTS = 8;
const FIRST_DELAY_MS = 1000;
const MAX_DELAY_MS = 15000;

const status = document.getElementById('status');
const message = document.getElementById('message');
const elapsed = document.getElementById('elapsed');
const detail = document.getElementById('detail');
const screen = document.getElementById('screen');

function meta(name) {
    return document.querySelector(`meta[name="${name}"]`).content;
}

const tokenParameter = meta('twisted-novnc-token-parameter');
const sessionId = location.pathname.slice(location.pathname.lastIndexOf('/') + 1);
const token = new URLSearchParams(location.search).get(tokenParameter);

function websocketUrl() {
    const path = meta('twisted-novnc-websocket-path').replace('{session_id}', sessionId);
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const query = token === null ? '' : `?${tokenParameter}=${encodeURIComponent(token)}`;
    return `${scheme}//${location.host}${path}${query}`;
}

let attempts = 0; // reconnections since the last desktop shown
let cause = null; // why those began: {words, why} of the close that began them
let ticker = null;
let endedHere = null; // a message of the page's own, when it closed the connection itself

function show(text, more = '') {
    status.hidden = false;
    message.textContent = text;
    detail.textContent = more;
}

function startWaiting() {
    const since = performance.now();
    message.textContent = 'Waiting for your desktop…';
    status.hidden = false;
    const tick = () => {
        elapsed.textContent = `${Math.floor((performance.now() - since) / 1000)} s`;
    };
    tick();
    ticker = setInterval(tick, 250);
}

function stopWaiting() {
    clearInterval(ticker);
    ticker = null;
    elapsed.textContent = '';
}

function closed(code, reason) {
    stopWaiting();
    const words = MESSAGES[code] ?? `The connection closed (code ${code}).`;
    const why = `Close code ${code}${reason ? `: ${reason}` : ''}.`;
    if (endedHere !== null) {
        show(endedHere, why);
        return;
    }
    const retry = RECONNECT.has(code) || (code === 1006 && attempts > 0);
    if (!retry) {
        show(words, why);
        return;
    }
    // What the user reads stays the close that began the reconnections (1001, 4503), not
    // the 1006 of an attempt made while the proxy was still away.
    cause = attempts === 0 ? { words, why } : cause;
    if (attempts >= MAX_ATTEMPTS) {
        show(cause.words, `${cause.why} Gave up after ${attempts} attempts: reload to try again.`);
        return;
    }
    attempts += 1;
    const delay = Math.min(FIRST_DELAY_MS * 2 ** (attempts - 1), MAX_DELAY_MS);
    show(cause.words,
         `${cause.words} ${cause.why} Reconnecting (attempt ${attempts} of ${MAX_ATTEMPTS})…`);
    // Up to a quarter less, so that many pages closed at once do not all come back at once.
    setTimeout(connect, delay * (1 - Math.random() / 4));
}

function connect() {
    endedHere = null;
    const ws = new WebSocket(websocketUrl(), ['binary']);
    ws.addEventListener('close', (e) => closed(e.code, e.reason));
    startWaiting();
    const rfb = new RFB(screen, ws);
    rfb.scaleViewport = true;
    rfb.addEventListener('connect', () => {
        attempts = 0;
        cause = null;
        stopWaiting();
        show('', '');
        status.hidden = true;
        rfb.focus();
    });
    rfb.addEventListener('desktopname', (e) => {
        document.title = e.detail.name;
    });
    // The proxy logs in to the VM when it holds the VM's password ([vnc]); without it the
    // page has none to give.
    rfb.addEventListener('credentialsrequired', () => {
        endedHere = 'Your desktop asks for a password, which this page cannot give.';
        rfb.disconnect();
    });
    rfb.addEventListener('securityfailure', (e) => {
        endedHere = `Your desktop refused the login${e.detail.reason ? `: ${e.detail.reason}` : ''}.`;
    });
}

connect();
