// The test page: the real noVNC client connected to the URL in ?ws=...
//
// Every event the tests wait on is recorded in window.tnovnc.events and printed on the console
// as "tnovnc-event {json}", which the driver forwards to the test as it happens.
import RFB from '/novnc/core/rfb.js';
import { initLogging } from '/novnc/core/util/logging.js';

// noVNC binds its log functions to the console here, once; 'info' makes its reasons visible.
initLogging('info');

const events = [];
const sockets = [];
const status = document.getElementById('status');

function record(event) {
    events.push(event);
    console.log('tnovnc-event ' + JSON.stringify(event));
}

// noVNC refuses a WebSocket subclass (it checks the prototype for the channel's members), so
// the native constructor is wrapped instead: each socket is a plain native WebSocket.
window.WebSocket = new Proxy(window.WebSocket, {
    construct(target, args) {
        const ws = Reflect.construct(target, args);
        sockets.push(ws);
        ws.addEventListener('open', () => record({ type: 'wsopen', protocol: ws.protocol }));
        ws.addEventListener('close', (e) => {
            status.textContent = `closed ${e.code} ${e.reason}`;
            record({ type: 'wsclose', code: e.code, reason: e.reason, wasClean: e.wasClean });
        });
        return ws;
    },
});

const url = new URLSearchParams(location.search).get('ws');
const rfb = new RFB(document.getElementById('screen'), url);
rfb.addEventListener('connect', () => {
    status.textContent = 'connected';
    record({ type: 'connect' });
});
rfb.addEventListener('disconnect', (e) => record({ type: 'disconnect', clean: e.detail.clean }));
rfb.addEventListener('securityfailure',
    (e) => record({ type: 'securityfailure', status: e.detail.status, reason: e.detail.reason }));
rfb.addEventListener('desktopname', (e) => record({ type: 'desktopname', name: e.detail.name }));
// noVNC asks the user for a password (or user name) here: a page behind [vnc] must never.
rfb.addEventListener('credentialsrequired',
    (e) => record({ type: 'credentialsrequired', types: e.detail.types }));
status.textContent = 'connecting';

window.tnovnc = {
    rfb,
    events,
    sockets,
    // The colour of one framebuffer pixel as noVNC drew it on its canvas.
    pixel(x, y) {
        const canvas = document.querySelector('#screen canvas');
        if (!canvas || canvas.width <= x || canvas.height <= y) {
            return null;
        }
        const [r, g, b] = canvas.getContext('2d').getImageData(x, y, 1, 1).data;
        return [r, g, b];
    },
    // Whether that pixel is within `tolerance` of [r, g, b] in every channel.
    pixelIs(x, y, rgb, tolerance) {
        const pixel = this.pixel(x, y);
        return pixel !== null && pixel.every((v, i) => Math.abs(v - rgb[i]) <= tolerance);
    },
};
record({ type: 'created', url });
