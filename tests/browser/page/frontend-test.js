// Runs the README's frontend snippet (frontend.js) as a platform's page would, on the proxy,
// session and token in ?proxy=...&session=...&token=..., and reports what it saw as
// "tnovnc-event {json}" console lines (as vnc.js does).
import { openDesktop } from './frontend.js';

const params = new URLSearchParams(location.search);
const status = document.getElementById('status');
const events = [];

function record(event) {
    events.push(event);
    console.log('tnovnc-event ' + JSON.stringify(event));
}

function showWhy(code, reason) {
    status.textContent = `closed ${code} ${reason}`;
    record({ type: 'why', code, reason });
}

const rfb = openDesktop(document.getElementById('screen'), params.get('proxy'),
                        params.get('session'), params.get('token'), showWhy);
rfb.addEventListener('connect', () => record({ type: 'connect' }));

window.tnovnc = {
    rfb,
    events,
    pixelIs(x, y, rgb, tolerance) {
        const canvas = document.querySelector('#screen canvas');
        if (!canvas || canvas.width <= x || canvas.height <= y) {
            return false;
        }
        const pixel = canvas.getContext('2d').getImageData(x, y, 1, 1).data;
        return rgb.every((v, i) => Math.abs(pixel[i] - v) <= tolerance);
    },
};
record({ type: 'created' });
