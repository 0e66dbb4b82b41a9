// The player of one recording (twisted_novnc/recording/format.py): noVNC's own RFB client,
// fed the bytes the browser received (the D records) at their recorded times through a
// WebSocket-like channel (noVNC's Websock.attach accepts any object with the props it checks);
// what RFB sends goes nowhere, and the recorded server answers anyway.
//
// The page is /recordings/<name>; the file comes from /recordings/<name>/data.  The body's
// data-state says where playback is (loading, playing, paused, ended, error) and its
// data-position the position in milliseconds: the browser tests wait on them.  A query
// ?speed=1|2|4|8|max picks the starting speed.
//
// noVNC's private names are used only in `display` below (as noVNC's own tests/playback.js
// uses them), checked against the vendored copy by a canary in tests/test_playback.py.
import RFB from '../novnc/core/rfb.js';

const MAGIC = 'TNOVNC-REC 1\n';
const HEAD = 13; // kind (1), milliseconds (8), payload length (4)
const DOWN = 0x44, UP = 0x55, NOTE = 0x4e, END = 0x45;
const KINDS = new Set([DOWN, UP, NOTE, END]);
// At the fastest speed, feed this many milliseconds of work per turn, then let the page breathe.
const SLICE_MS = 20;
// The longest wait between two position updates at real speed.
const TICK_MS = 250;

const body = document.body;
const screen = document.getElementById('screen');
const statusLine = document.getElementById('status');
const playButton = document.getElementById('play');
const speedSelect = document.getElementById('speed');
const bar = document.getElementById('position');
const timeLabel = document.getElementById('time');
const meta = document.getElementById('meta');

// While the position bar is held, playback does not move it under the pointer.
let dragging = false;

const name = decodeURIComponent(location.pathname.slice(location.pathname.lastIndexOf('/') + 1));

// The recording: its header, the D records (offsets into the file), notes and end.
export function parse(buffer) {
    const bytes = new Uint8Array(buffer);
    const text = new TextDecoder();
    if (text.decode(bytes.subarray(0, MAGIC.length)) !== MAGIC) {
        throw new Error('this file is not a recording');
    }
    const newline = bytes.indexOf(0x0a, MAGIC.length);
    if (newline < 0) {
        throw new Error('the recording\'s header is cut');
    }
    const header = JSON.parse(text.decode(bytes.subarray(MAGIC.length, newline)));
    const view = new DataView(buffer);
    const frames = [];
    const notes = [];
    let ending = null;
    let lastMs = 0;
    let at = newline + 1;
    while (at + HEAD <= bytes.length) {
        const kind = bytes[at];
        if (!KINDS.has(kind)) {
            break; // not a record boundary: the rest is not trusted
        }
        const ms = Number(view.getBigUint64(at + 1));
        const length = view.getUint32(at + 9);
        const start = at + HEAD;
        if (start + length > bytes.length) {
            break; // the cut record of a file whose process ended first
        }
        lastMs = ms;
        const payload = bytes.subarray(start, start + length);
        if (kind === DOWN) {
            frames.push({ ms, payload });
        } else if (kind === NOTE) {
            try {
                notes.push(JSON.parse(text.decode(payload)));
            } catch {
                // a note that does not parse says nothing
            }
        } else if (kind === END) {
            ending = JSON.parse(text.decode(payload));
            break;
        }
        at = start + length;
    }
    return { header, frames, notes, ending, lastMs };
}

// What RFB needs of a WebSocket; readyState as RTCDataChannel spells it.
class Channel {
    constructor() {
        this.binaryType = 'arraybuffer';
        this.protocol = '';
        this.readyState = 'connecting';
        this.onerror = () => {};
        this.onmessage = () => {};
        this.onopen = () => {};
        this.onclose = () => {};
    }

    open() {
        this.readyState = 'open';
        this.onopen();
    }

    deliver(payload) {
        this.onmessage({ data: payload });
    }

    send() {
        // the recorded server needs no answer
    }

    close() {
        if (this.readyState === 'closed') {
            return;
        }
        this.readyState = 'closed';
        queueMicrotask(() => this.onclose({ code: 1000, reason: '', wasClean: true }));
    }
}

function seconds(ms) {
    return `${(ms / 1000).toFixed(1)} s`;
}

function setState(state, words) {
    body.dataset.state = state;
    if (words !== undefined) {
        statusLine.textContent = words;
    }
}

function showMeta(rec) {
    const { header, ending, notes, lastMs } = rec;
    const stopped = (ending && ending.stopped) || notes.map((n) => n.stopped).find((s) => s);
    const rows = [
        ['Session', header.session_id],
        ['Connection', header.connection_id],
        ['Client', header.client],
        ['Start', new Date(header.started_at * 1000).toISOString()],
        ['End', ending ? new Date(ending.ended_at * 1000).toISOString()
            : `${new Date(header.started_at * 1000 + lastMs).toISOString()} (last record)`],
        ['Duration', seconds(lastMs)],
        ['Bytes', ending
            ? `${ending.recorded_bytes} recorded (down ${ending.down_bytes}, up ${ending.up_bytes})`
            : `${rec.frames.reduce((n, f) => n + f.payload.length, 0)} received`],
        ['Outcome', ending ? `close code ${ending.outcome}`
            : 'cut: the recording\'s process ended first'],
        ['Stopped early', stopped || 'no'],
        ['Input recorded', header.input ? 'yes' : 'no'],
        ['Recorded by', header.version ? `twisted_novnc ${header.version}` : '-'],
    ];
    meta.textContent = '';
    for (const [term, value] of rows) {
        const dt = document.createElement('dt');
        const dd = document.createElement('dd');
        dt.textContent = term;
        dd.textContent = String(value);
        meta.append(dt, dd);
    }
    document.title = `Recording of ${header.session_id}`;
}

function nextTurn(ms = 0) {
    return new Promise((resolve) => setTimeout(resolve, ms));
}

// The only place noVNC's private names are used (RFB's flushing flag, its display's pending()
// and flush()): feeding faster than real time waits while RFB has paused its message loop for the
// display to catch up, and the end is declared once the last frame is on the canvas.  Without
// them (a noVNC that renamed them) the public path: RFB queues what it is fed and draws it in
// its own time, and the end waits a few animation frames instead.
const display = {
    known(rfb) {
        return typeof rfb._flushing === 'boolean' && rfb._display !== undefined
            && typeof rfb._display.pending === 'function'
            && typeof rfb._display.flush === 'function';
    },
    // Whether RFB stopped taking messages until the display catches up.
    busy(rfb) {
        return display.known(rfb) && rfb._flushing;
    },
    // Whether everything fed is drawn.
    drawn(rfb) {
        return !display.known(rfb) || (!rfb._flushing && !rfb._display.pending());
    },
    // Until the display has drawn what it holds.
    async catchUp(rfb) {
        if (display.known(rfb)) {
            await rfb._display.flush();
        } else {
            for (let i = 0; i < 3; i++) {
                await new Promise((resolve) => requestAnimationFrame(resolve));
            }
        }
    },
};

class Player {
    constructor(rec) {
        this.rec = rec;
        this.speed = 1;
        this.playing = false;
        this.ended = false;
        this.position = 0; // milliseconds into the recording
        this.index = 0; // the next frame to feed
        this.generation = 0; // bumped to stop whatever loop runs
        this.rfb = null;
        this.channel = null;
        this.holder = null;
        this.wallStart = 0;
        this.positionStart = 0;
    }

    // A new RFB on a new channel, at the recording's start.
    fresh() {
        if (this.rfb !== null) {
            this.rfb.disconnect();
            this.holder.remove();
        }
        this.holder = document.createElement('div');
        screen.append(this.holder);
        this.channel = new Channel();
        const rfb = new RFB(this.holder, this.channel);
        rfb.viewOnly = true;
        // The recorded server answered the live browser's login: any answer will do here.
        rfb.addEventListener('credentialsrequired', () => {
            rfb.sendCredentials({ username: 'playback', password: 'playback', target: 'playback' });
        });
        this.rfb = rfb;
        this.channel.open();
        this.index = 0;
        this.position = 0;
        this.ended = false;
    }

    feedOne() {
        this.channel.deliver(this.rec.frames[this.index].payload);
        this.index += 1;
    }

    // Until the display has drawn everything it was given.
    async settle(generation) {
        for (let i = 0; i < 1000 && generation === this.generation; i++) {
            if (display.drawn(this.rfb)) {
                if (!display.known(this.rfb)) {
                    await display.catchUp(this.rfb);
                }
                return;
            }
            await display.catchUp(this.rfb);
        }
    }

    // Feed every frame up to ``ms`` as fast as the display takes them.
    async fastForward(ms, generation) {
        const frames = this.rec.frames;
        while (generation === this.generation && this.index < frames.length
               && frames[this.index].ms <= ms) {
            const until = performance.now() + SLICE_MS;
            while (this.index < frames.length && frames[this.index].ms <= ms
                   && performance.now() < until && !display.busy(this.rfb)) {
                this.feedOne();
            }
            this.position = this.index > 0 ? frames[this.index - 1].ms : 0;
            this.show();
            if (display.busy(this.rfb)) {
                await this.settle(generation);
            } else {
                await nextTurn();
            }
        }
        if (generation === this.generation) {
            this.position = Math.max(this.position, Math.min(ms, this.rec.lastMs));
        }
    }

    show() {
        body.dataset.position = String(Math.round(this.position));
        if (dragging) {
            return;
        }
        bar.value = String(Math.round(this.position));
        timeLabel.textContent = `${seconds(this.position)} / ${seconds(this.rec.lastMs)}`;
    }

    async run(generation) {
        const frames = this.rec.frames;
        while (generation === this.generation && this.playing) {
            if (this.index >= frames.length && (this.speed === 'max'
                                                || this.position >= this.rec.lastMs)) {
                await this.finish(generation);
                return;
            }
            if (this.speed === 'max') {
                await this.fastForward(Infinity, generation);
                continue;
            }
            const elapsed = (performance.now() - this.wallStart) * this.speed;
            this.position = Math.min(this.rec.lastMs, this.positionStart + elapsed);
            while (this.index < frames.length && frames[this.index].ms <= this.position) {
                this.feedOne();
            }
            this.show();
            const next = this.index < frames.length ? frames[this.index].ms : this.rec.lastMs;
            await nextTurn(Math.min(TICK_MS, Math.max(0, (next - this.position) / this.speed)));
        }
    }

    async finish(generation) {
        await this.settle(generation);
        if (generation !== this.generation) {
            return;
        }
        this.position = this.rec.lastMs;
        this.playing = false;
        this.ended = true;
        this.show();
        playButton.textContent = 'Play again';
        setState('ended', this.rec.ending ? 'The recording has ended.'
            : 'The recording has ended (its file was cut: the process ended first).');
    }

    start() {
        this.generation += 1;
        this.playing = true;
        this.wallStart = performance.now();
        this.positionStart = this.position;
        playButton.textContent = 'Pause';
        setState('playing', 'Playing.');
        this.run(this.generation);
    }

    play() {
        if (this.ended) {
            this.seek(0, true);
            return;
        }
        this.start();
    }

    pause() {
        this.generation += 1;
        this.playing = false;
        playButton.textContent = 'Play';
        this.show();
        setState('paused', 'Paused.');
    }

    setSpeed(value) {
        this.speed = value === 'max' ? 'max' : Number(value);
        this.positionStart = this.position;
        this.wallStart = performance.now();
    }

    // Back: a fresh RFB fast-forwarded to ``ms``; forward: on from where it is.
    async seek(ms, play = this.playing) {
        this.generation += 1;
        const generation = this.generation;
        this.playing = false;
        setState('seeking', `Seeking to ${seconds(ms)}…`);
        if (ms < this.position || this.ended || this.rfb === null) {
            this.fresh();
        }
        await this.fastForward(ms, generation);
        if (generation !== this.generation) {
            return;
        }
        this.show();
        if (this.index >= this.rec.frames.length && ms >= this.rec.lastMs) {
            await this.finish(generation);
        } else if (play) {
            this.start();
        } else {
            await this.settle(generation);
            if (generation === this.generation) {
                this.pause();
            }
        }
    }
}

async function main() {
    const response = await fetch(`${encodeURIComponent(name)}/data`);
    if (!response.ok) {
        throw new Error(`the recording could not be loaded (HTTP ${response.status})`);
    }
    const rec = parse(await response.arrayBuffer());
    showMeta(rec);
    const player = new Player(rec);
    bar.max = String(rec.lastMs);
    bar.disabled = false;
    playButton.disabled = false;
    const asked = new URLSearchParams(location.search).get('speed');
    if (asked !== null && [...speedSelect.options].some((o) => o.value === asked)) {
        speedSelect.value = asked;
    }
    player.setSpeed(speedSelect.value);
    speedSelect.addEventListener('change', () => player.setSpeed(speedSelect.value));
    playButton.addEventListener('click', () => (player.playing ? player.pause() : player.play()));
    bar.addEventListener('input', () => {
        dragging = true;
        timeLabel.textContent = `${seconds(Number(bar.value))} / ${seconds(rec.lastMs)}`;
    });
    bar.addEventListener('change', () => {
        dragging = false;
        player.seek(Number(bar.value));
    });
    player.fresh();
    player.show();
    player.start();
}

main().catch((e) => {
    setState('error', `Cannot play this recording: ${e.message}`);
});
