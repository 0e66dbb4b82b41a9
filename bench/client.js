'use strict';
// Load client of bench/run.py (adapted from shared/tools/wsbench). One scenario per invocation;
// prints one JSON result line on stdout (and, for conc/ready, one {"event":...} line first).
//
//   node client.js SCENARIO --url URL [--ids FILE] [options]
//
// URL: ws://host:port/any/path?query  (WebSocket, subprotocol "binary", binary messages)
//      tcp://host:port                (raw TCP, for TCP relays such as socat)
// --ids FILE: one session id per line; "{id}" in the URL becomes ids[i % n] for connection i
// (twisted_novnc: every connection names its own session row).
//
// SCENARIO      what it does                                           main options
//   down        receive --bytes from a "source" target, MiB/s           --bytes
//   down-vnc    down after the browser's side of twisted_novnc's RFB      --bytes
//               greeting (with [vnc] set the proxy logs in to the VM, then offers the browser
//               RFB 3.8 with security None: "RFB 003.008\n", [1, 1], SecurityResult 0; the
//               client answers "RFB 003.008\n", 1, then ClientInit 1); the greeting's bytes
//               and time are not in MiB/s, which counts from ClientInit sent
//   up          send --bytes in --msg-size messages to a "sink" target  --bytes --msg-size --window
//               (target acks with one byte once all arrived), MiB/s
//   echo        --count sequential --msg-size round trips, p50/p99 us   --count --msg-size --warmup
//   setup       --count sequential open/first-byte/close cycles         --count
//   conc        hold --conns idle connections (each got the banner);    --conns --parallel --hold
//               prints {"event":"ready"} then waits for a line on stdin (or --hold seconds)
//   streams     --conns concurrent connections each receiving --bytes   --conns --bytes
//   ready       one connection per id, all at once; prints {"event":"sent"} once every upgrade
//               request is written, then records when each 101 arrives (CLOCK_MONOTONIC ns,
//               comparable with Python's time.monotonic_ns) and whether a data frame followed;
//               ends when all are settled or after --wait seconds
//   soak        --conns connections through one daemon, --parallel in flight: each opens, sends
//               --bytes (16 KiB messages) to an echo target and reads them back, then closes;
//               one in ten names an unknown session (a fresh UUID; refused, own pool of
//               --unknown-parallel, as each waits for the daemon's deadline), one in ten is cut
//               mid-relay, alternately by the browser (socket destroyed after a quarter came
//               back) and by the VM (a --cut-ids session, whose target closes after 16 KiB);
//               prints {"event":"progress","done":N} every --progress connections and the tally;
//               after --pause-at connections it lets every one end, prints {"event":"paused"}
//               and waits for a line on stdin (the harness samples the idle daemon)
//   upgrade     plays both ends of --conns relays: listens on 127.0.0.1:--vm-port as their VMs,
//               opens one browser per id; each relay then carries one numbered --chunk-byte
//               record each way every --interval ms (relays spread evenly over the interval);
//               prints {"event":"streaming"} after the first second of it, streams until a line
//               "stop TRIGGER_NS ANSWER_NS" on stdin (the harness's upgrade, CLOCK_MONOTONIC),
//               waits until every record sent has arrived (at most --drain s), and reports
//               each relay's pause (below; over records sent after the first --warmup ms),
//               closes, lost/duplicated/reordered records, and the delays by send time
//               (--bucket ms steps from the trigger)
// setup and conc open connections with a minimal hand-written handshake (rawOpen) unless
// --open ws asks for the ws library; echo always uses ws.
// Every scenario is bounded by --timeout seconds (default 180): on expiry it prints a JSON
// line with "error":"timeout" and exits 3.
const net = require('net');
const WebSocket = require('ws');

const argv = process.argv.slice(2);
const scenario = argv[0];
const opt = { url: null, ids: null, bytes: null, 'msg-size': null, count: null, warmup: null, conns: null,
  parallel: 64, window: 16, hold: 600, wait: 60, timeout: 180, label: '', recv: 'fast', send: 'fast', open: 'raw',
  'vm-port': null, interval: 50, chunk: 32, drain: 15, bucket: 250, warmup: 1000,
  'cut-ids': null, 'unknown-parallel': 256, progress: 10000, 'pause-at': null };
for (let i = 1; i < argv.length; i += 2) {
  const k = argv[i].replace(/^--/, '');
  if (!(k in opt)) { console.error('unknown option ' + argv[i]); process.exit(2); }
  opt[k] = argv[i + 1];
}
const num = (v, d) => (v === null || v === undefined ? d : Number(v));
const MiB = 1048576;
const isTcp = opt.url && opt.url.startsWith('tcp://');
const now = () => Number(process.hrtime.bigint()) / 1e6; // ms

// Whether ws masks/unmasks with bufferutil's native code (the client's ceiling depends on it).
let nativeMask = false;
try { nativeMask = /native code/.test(require('bufferutil').mask.toString()); } catch (e) { nativeMask = false; }
// An ids line is "ID" or "ID PORT": with a port, that connection goes to that port instead of
// the URL's (scale: one client, many daemons).
const idLines = opt.ids ? require('fs').readFileSync(opt.ids, 'utf8').split('\n').map((x) => x.trim()).filter(Boolean).map((x) => x.split(/\s+/)) : null;
const ids = idLines ? idLines.map((x) => x[0]) : null;
const idPorts = idLines ? idLines.map((x) => x[1] || null) : null;
// The URL of connection i: "{id}" names that connection's session.
function urlFor(i) {
  if (!opt.url.includes('{id}')) return opt.url;
  if (!ids || !ids.length) throw new Error('the URL holds {id} but no --ids file was given');
  const url = opt.url.replace('{id}', encodeURIComponent(ids[i % ids.length]));
  const port = idPorts[i % ids.length];
  if (!port) return url;
  const u = new URL(url); u.port = port; return u.toString();
}
function emit(obj) {
  process.stdout.write(JSON.stringify(Object.assign({ scenario, transport: isTcp ? 'tcp' : 'ws', label: opt.label || undefined, bufferutil: nativeMask }, obj)) + '\n');
}
const deadline = setTimeout(() => { emit({ error: 'timeout', timeout_s: num(opt.timeout) }); process.exit(3); }, num(opt.timeout) * 1000);
deadline.unref();

// Uniform connection: open(url, onData) -> Promise<conn>; conn.send(buf, cb); conn.close() -> Promise
function open(url, onData, onClose) {
  return new Promise((resolve, reject) => {
    if (isTcp) {
      const u = new URL(url);
      const s = net.connect({ host: u.hostname, port: Number(u.port) });
      s.setNoDelay(true);
      s.on('data', onData);
      s.once('connect', () => {
        s.removeListener('error', reject);
        s.on('error', () => {});
        resolve({
          send: (b, cb) => s.write(b, cb),
          close: () => new Promise((r) => {
            if (s.destroyed) return r();
            const t = setTimeout(() => { s.destroy(); r(); }, 2000);
            s.once('close', () => { clearTimeout(t); r(); });
            s.end();
          }),
          destroy: () => s.destroy(),
        });
      });
      s.once('error', reject);
      if (onClose) s.once('close', onClose);
    } else {
      const ws = new WebSocket(url, ['binary'], { perMessageDeflate: false, maxPayload: 0, handshakeTimeout: 30000 });
      ws.on('message', (d) => onData(Buffer.isBuffer(d) ? d : Array.isArray(d) ? Buffer.concat(d) : Buffer.from(d)));
      if (onClose) ws.once('close', (code) => onClose(code));
      const fail = (e) => reject(e);
      ws.once('error', fail);
      ws.once('unexpected-response', (req, res) => { reject(new Error('HTTP ' + res.statusCode)); ws.terminate(); });
      ws.once('open', () => {
        ws.removeListener('error', fail);
        ws.on('error', () => {});
        resolve({
          send: (b, cb) => ws.send(b, { binary: true }, cb),
          close: () => new Promise((r) => {
            if (ws.readyState === WebSocket.CLOSED) return r();
            const t = setTimeout(() => { ws.terminate(); r(); }, 2000);
            ws.once('close', () => { clearTimeout(t); r(); });
            ws.close(1000);
          }),
          destroy: () => ws.terminate(),
        });
      });
    }
  });
}


// Receive-only fast path (down/streams over ws://): does the RFC 6455 handshake with node's
// http module, then parses frame headers itself and only counts payload bytes (no copy, no
// per-message Buffer), so the client is not the bottleneck for the downstream direction.
// Server->client frames must be unmasked, no extensions (we offer none). --recv ws uses the
// ws library instead.
const http = require('http');
const crypto = require('crypto');
// A short binary message from the client, masked with the zero key (payload as is).
function zeroMaskFrame(m) {
  if (m.length >= 126) throw new Error('zeroMaskFrame: short messages only');
  return Buffer.concat([Buffer.from([0x82, 0x80 | m.length, 0, 0, 0, 0]), m]);
}
function fastRecv(url, onBytes, onClose, wantSock) {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const key = crypto.randomBytes(16).toString('base64');
    const req = http.request({ host: u.hostname, port: Number(u.port), path: u.pathname + u.search, agent: false,
      headers: { Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13', 'Sec-WebSocket-Key': key,
        'Sec-WebSocket-Protocol': 'binary' } });
    req.on('error', reject);
    req.on('response', (res) => { reject(new Error('HTTP ' + res.statusCode)); res.resume(); });
    req.on('upgrade', (res, sock, head) => {
      const want = crypto.createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
      if (res.headers['sec-websocket-accept'] !== want) { sock.destroy(); return reject(new Error('bad accept')); }
      sock.setNoDelay(true);
      let hb = Buffer.alloc(14), hn = 0, need = 2, left = 0, op = 0, inPayload = false, closed = false;
      const feed = (b) => {
        let off = 0;
        while (off < b.length) {
          if (inPayload) {
            const n = Math.min(left, b.length - off);
            if (op !== 8 && op !== 9 && op !== 10) onBytes(n, b, off);
            off += n; left -= n;
            if (left === 0) { inPayload = false; hn = 0; need = 2; if (op === 8) { closed = true; sock.end(); } }
            continue;
          }
          while (hn < need && off < b.length) hb[hn++] = b[off++];
          if (hn < need) break;
          if (need === 2) {
            const l7 = hb[1] & 127;
            if (hb[1] & 128) { sock.destroy(); return; } // masked server frame: protocol error
            need = l7 === 126 ? 4 : l7 === 127 ? 10 : 2;
            if (need > 2) continue;
          }
          op = hb[0] & 15; const l7 = hb[1] & 127;
          left = l7 === 126 ? hb.readUInt16BE(2) : l7 === 127 ? Number(hb.readBigUInt64BE(2)) : l7;
          if (op === 9) sock.write(Buffer.from([0x8a, 0x80, 0, 0, 0, 0])); // pong (empty, masked)
          if (left === 0) { hn = 0; need = 2; if (op === 8) { closed = true; sock.end(); } } else inPayload = true;
        }
      };
      sock.on('data', feed);
      sock.on('error', () => {});
      if (onClose) sock.once('close', onClose);
      if (head && head.length) feed(head);
      resolve({
        sock,
        send: (m) => sock.write(zeroMaskFrame(m)),
        close: () => new Promise((r) => {
          if (sock.destroyed) return r();
          const t = setTimeout(() => { sock.destroy(); r(); }, 2000);
          sock.once('close', () => { clearTimeout(t); r(); });
          if (!closed) sock.write(Buffer.from([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])); // masked close 1000 (zero mask)
          sock.end();
        }),
      });
    });
    req.end();
  });
}
const useFast = !isTcp && opt.recv !== 'ws';
const useFastSend = !isTcp && opt.send !== 'ws';
// Pre-masked frames for the upload fast path: the client masks one block of 16 frames once
// (fixed non-zero key) and writes that block repeatedly; the proxy still has to unmask every byte.
function maskedBlock(msg, frames) {
  const key = crypto.randomBytes(4); key[0] |= 1;
  const payload = Buffer.alloc(msg, 'y');
  const hl = msg < 126 ? 2 : msg < 65536 ? 4 : 10;
  const f = Buffer.alloc(hl + 4 + msg);
  f[0] = 0x82;
  if (hl === 2) f[1] = 0x80 | msg; else if (hl === 4) { f[1] = 0x80 | 126; f.writeUInt16BE(msg, 2); } else { f[1] = 0x80 | 127; f.writeBigUInt64BE(BigInt(msg), 2); }
  key.copy(f, hl);
  for (let i = 0; i < msg; i++) f[hl + 4 + i] = payload[i] ^ key[i & 3];
  return Buffer.concat(Array.from({ length: frames }, () => f));
}
// Raw WebSocket open (setup/conc, and echo with --open raw): net.connect, one fixed upgrade
// request, the 101 checked against the fixed key's accept value, then unmasked server frames
// parsed by hand; sends are masked with a zero key (legal, and the payload goes out as is).
// Much cheaper per connection than the ws library, so setup measures the proxy, not the client.
const RAW_KEY = 'dGhlIHNhbXBsZSBub25jZQ==';
const RAW_ACCEPT = 's3pPLMBiTxaQ9kYGzzhZRbK+xOo=';
function rawOpen(url, onData, onClose) {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const s = net.connect({ host: u.hostname, port: Number(u.port) });
    s.setNoDelay(true);
    let head = Buffer.alloc(0), open = false, settled = false, closeCode = null;
    let hb = Buffer.alloc(14), hn = 0, need = 2, left = 0, op = 0, inPayload = false;
    const fail = (e) => { if (!settled) { settled = true; reject(e); } s.destroy(); };
    const frames = (b) => {
      let off = 0;
      while (off < b.length) {
        if (inPayload) {
          const n = Math.min(left, b.length - off);
          if (op === 8) { if (closeCode === null && n >= 2) closeCode = b.readUInt16BE(off); }
          else if (op < 8) onData(b.subarray(off, off + n));
          off += n; left -= n;
          if (left === 0) { inPayload = false; hn = 0; need = 2; if (op === 8) s.end(); }
          continue;
        }
        while (hn < need && off < b.length) hb[hn++] = b[off++];
        if (hn < need) break;
        if (need === 2) {
          const l7 = hb[1] & 127;
          if (hb[1] & 128) { s.destroy(); return; }
          need = l7 === 126 ? 4 : l7 === 127 ? 10 : 2;
          if (need > 2) continue;
        }
        op = hb[0] & 15; const l7 = hb[1] & 127;
        left = l7 === 126 ? hb.readUInt16BE(2) : l7 === 127 ? Number(hb.readBigUInt64BE(2)) : l7;
        if (left === 0) { hn = 0; need = 2; if (op === 8) s.end(); } else inPayload = true;
      }
    };
    s.on('data', (d) => {
      if (open) return frames(d);
      head = Buffer.concat([head, d]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) { if (head.length > 8192) fail(new Error('no HTTP response end')); return; }
      const text = head.subarray(0, end).toString('latin1');
      const status = text.slice(0, text.indexOf('\r\n'));
      if (!/^HTTP\/1\.1 101/.test(status)) return fail(new Error(status.slice(9, 12) ? 'HTTP ' + status.slice(9, 12) : 'bad response'));
      if (!text.includes(RAW_ACCEPT)) return fail(new Error('bad accept'));
      open = true; settled = true;
      resolve({
        send: (b, cb) => {
          const n = b.length;
          const h = n < 126 ? Buffer.from([0x82, 0x80 | n, 0, 0, 0, 0])
            : n < 65536 ? Buffer.from([0x82, 0x80 | 126, n >> 8, n & 255, 0, 0, 0, 0])
              : (() => { const x = Buffer.alloc(14); x[0] = 0x82; x[1] = 0x80 | 127; x.writeBigUInt64BE(BigInt(n), 2); return x; })();
          s.write(h); return s.write(b, cb);
        },
        close: () => new Promise((r) => {
          if (s.destroyed) return r();
          const t = setTimeout(() => { s.destroy(); r(); }, 2000);
          s.once('close', () => { clearTimeout(t); r(); });
          s.write(Buffer.from([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]));
          s.end();
        }),
        destroy: () => s.destroy(),
      });
      const rest = head.subarray(end + 4);
      head = null;
      if (rest.length) frames(rest);
    });
    s.on('error', (e) => fail(e));
    s.once('close', () => { if (!settled) fail(new Error('closed during the handshake')); else if (onClose) onClose(closeCode === null ? 1006 : closeCode); });
    s.once('connect', () => {
      s.write('GET ' + u.pathname + u.search + ' HTTP/1.1\r\nHost: ' + u.host + '\r\nUpgrade: websocket\r\n' +
        'Connection: Upgrade\r\nSec-WebSocket-Key: ' + RAW_KEY + '\r\nSec-WebSocket-Version: 13\r\n' +
        'Sec-WebSocket-Protocol: binary\r\n\r\n');
    });
  });
}
// setup and conc open with rawOpen unless --open ws; echo always uses ws (random masks).
const openLight = (url, onData, onClose) => (isTcp || opt.open === 'ws' ? open(url, onData, onClose) : rawOpen(url, onData, onClose));
function openRecv(url, onBytes, onClose) {
  return useFast ? fastRecv(url, onBytes, onClose) : open(url, (d) => onBytes(d.length, d, 0), onClose);
}

function pct(sorted, p) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}
const r3 = (x) => (x === null ? null : Math.round(x * 1000) / 1000);

async function down() {
  const bytes = num(opt.bytes, 256 * MiB);
  let got = 0, tOpen = 0, done;
  const fin = new Promise((r) => (done = r));
  const t0 = now();
  const c = await openRecv(urlFor(0), (n) => { got += n; if (got >= bytes) done(); }, () => done());
  tOpen = now();
  await fin;
  const t1 = now();
  c.close();
  const sec = (t1 - tOpen) / 1000;
  emit({ recv: isTcp ? undefined : (useFast ? 'fast' : 'ws'), bytes, received: got, ok: got >= bytes, seconds: r3(sec), mib_s: r3(got / MiB / sec), connect_ms: r3(tOpen - t0) });
}

// down-vnc: the proxy's RFB greeting to the browser, byte for byte, and what the browser
// answers once each part has arrived (at 12, 14 and 18 bytes): its version, its choice of
// security None, then ClientInit (shared = 1), after which the VM's bytes follow.
const GREETING = Buffer.from('RFB 003.008\n\x01\x01\x00\x00\x00\x00', 'latin1');
const ANSWERS = { 12: Buffer.from('RFB 003.008\n'), 14: Buffer.from([1]), 18: Buffer.from([1]) };

async function downVnc() {
  const bytes = num(opt.bytes, 256 * MiB);
  let got = 0, greeted = 0, tGreeted = 0, c = null, bad = null, done;
  const pending = [];
  const fin = new Promise((r) => (done = r));
  // The first bytes can arrive with the 101, before the connection object is ours.
  const send = (m) => (c ? c.send(m) : pending.push(m));
  const onBytes = (n, b, off) => {
    while (greeted < GREETING.length && n > 0) {
      if (b[off] !== GREETING[greeted]) { bad = `greeting byte ${greeted} is ${b[off]}, not ${GREETING[greeted]}`; return done(); }
      greeted++; off++; n--;
      if (ANSWERS[greeted]) send(ANSWERS[greeted]);
      if (greeted === GREETING.length) tGreeted = now();
    }
    got += n;
    if (got >= bytes) done();
  };
  const t0 = now();
  c = await openRecv(urlFor(0), onBytes, () => done());
  const tOpen = now();
  for (const m of pending.splice(0)) c.send(m);
  await fin;
  const t1 = now();
  c.close();
  if (bad || greeted < GREETING.length) {
    return emit({ error: bad || `closed after ${greeted} bytes of the greeting`, received: got });
  }
  const sec = (t1 - tGreeted) / 1000;
  emit({ recv: isTcp ? undefined : (useFast ? 'fast' : 'ws'), bytes, received: got, ok: got >= bytes, seconds: r3(sec),
    mib_s: r3(got / MiB / sec), connect_ms: r3(tOpen - t0), greeting_ms: r3(tGreeted - tOpen), greeting_bytes: greeted });
}

async function up() {
  const bytes = num(opt.bytes, 256 * MiB), msg = num(opt['msg-size'], 65536), win = num(opt.window, 16);
  let acked = false, done;
  const fin = new Promise((r) => (done = r));
  let c, sent = 0;
  const onAck = (d) => { if ((d.length ?? d) > 0) { acked = true; done(); } };
  if (useFastSend && bytes % (16 * msg) === 0) {
    c = await fastRecv(urlFor(0), onAck, () => done());
  } else {
    c = await open(urlFor(0), onAck, () => done());
  }
  const t0 = now();
  await new Promise((resolve) => {
    if (c.sock) { // fast path: write pre-masked 16-frame blocks with socket backpressure
      const block = maskedBlock(msg, 16);
      const pump = () => {
        while (sent < bytes) {
          sent += 16 * msg;
          if (!c.sock.write(block)) { if (sent < bytes) return c.sock.once('drain', pump); }
        }
        resolve();
      };
      return pump();
    }
    const buf = Buffer.alloc(msg, 'y');
    let inflight = 0;
    const pump = () => {
      while (sent < bytes && inflight < win) {
        const n = Math.min(msg, bytes - sent);
        sent += n; inflight++;
        c.send(n === msg ? buf : buf.subarray(0, n), () => { inflight--; if (sent < bytes) pump(); else if (inflight === 0) resolve(); });
      }
    };
    pump();
  });
  const tSent = now();
  await fin;
  const t1 = now();
  c.close();
  const sec = (t1 - t0) / 1000;
  emit({ send: isTcp ? undefined : (c.sock ? 'fast' : 'ws'), bytes, msg_size: msg, ok: acked, seconds: r3(sec), mib_s: r3(bytes / MiB / sec), send_done_s: r3((tSent - t0) / 1000) });
}

async function echo() {
  const count = num(opt.count, 10000), msg = num(opt['msg-size'], 64), warm = num(opt.warmup, 200);
  const buf = Buffer.alloc(msg, 'e');
  let got = 0, want = 0, wake = null;
  const c = await open(urlFor(0), (d) => { got += d.length; if (wake && got >= want) { const w = wake; wake = null; w(); } });
  const lat = [];
  const t0 = now();
  for (let i = 0; i < warm + count; i++) {
    want += msg;
    const ts = process.hrtime.bigint();
    const p = new Promise((r) => (wake = r));
    c.send(buf);
    if (got >= want) { wake = null; } else { await p; }
    const us = Number(process.hrtime.bigint() - ts) / 1000;
    if (i >= warm) lat.push(us);
  }
  const total = (now() - t0) / 1000;
  await c.close();
  const s = lat.slice().sort((a, b) => a - b);
  emit({ count, msg_size: msg, p50_us: r3(pct(s, 50)), p99_us: r3(pct(s, 99)), p999_us: r3(pct(s, 99.9)),
    mean_us: r3(lat.reduce((a, b) => a + b, 0) / lat.length), max_us: r3(s[s.length - 1]), rtt_per_s: r3((warm + count) / total) });
}

async function setup() {
  const count = num(opt.count, 1000);
  const setupMs = [], cycleMs = [];
  let errors = 0, firstErr = null;
  const t0 = now();
  for (let i = 0; i < count; i++) {
    const ts = now();
    let gotFirst;
    const first = new Promise((r) => (gotFirst = r));
    try {
      let code = null;
      const c = await openLight(urlFor(i), () => gotFirst(true), (cc) => { code = cc; gotFirst(false); });
      const ok = await first;
      const tf = now();
      await c.close();
      if (!ok) throw new Error('closed before first byte' + (code ? ' (' + code + ')' : ''));
      setupMs.push(tf - ts); cycleMs.push(now() - ts);
    } catch (e) { errors++; if (!firstErr) firstErr = String(e.message || e); }
  }
  const total = (now() - t0) / 1000;
  const s = setupMs.slice().sort((a, b) => a - b), cs = cycleMs.slice().sort((a, b) => a - b);
  emit({ open: isTcp ? undefined : opt.open, count, ok: setupMs.length, errors, first_error: firstErr, conn_per_s: r3(setupMs.length / total),
    setup_p50_ms: r3(pct(s, 50)), setup_p99_ms: r3(pct(s, 99)), cycle_p50_ms: r3(pct(cs, 50)), cycle_p99_ms: r3(pct(cs, 99)) });
}

async function conc() {
  const n = num(opt.conns, 1000), par = num(opt.parallel, 64);
  const conns = [];
  let errors = 0, closedEarly = 0, next = 0;
  const errKinds = {};
  const t0 = now();
  async function worker() {
    while (next < n) {
      const i = next++;
      let gotFirst;
      const first = new Promise((r) => (gotFirst = r));
      const st = { dead: false, code: null };
      try {
        const c = await openLight(urlFor(i), () => gotFirst(true), (cc) => { st.code = cc; gotFirst(false); st.dead = true; });
        c.st = st;
        const to = setTimeout(() => gotFirst(false), 30000);
        const ok = await first;
        clearTimeout(to);
        if (!ok) throw new Error('no first byte' + (st.code ? ' (' + st.code + ')' : ''));
        conns.push(c);
      } catch (e) { errors++; const k = String(e.code || e.message || e).slice(0, 60); errKinds[k] = (errKinds[k] || 0) + 1; }
    }
  }
  await Promise.all(Array.from({ length: par }, worker));
  const openSec = (now() - t0) / 1000;
  process.stdout.write(JSON.stringify({ event: 'ready', open: conns.length, errors }) + '\n');
  await new Promise((r) => {
    const t = setTimeout(r, num(opt.hold, 600) * 1000);
    process.stdin.once('data', () => { clearTimeout(t); r(); });
    process.stdin.once('end', () => { clearTimeout(t); r(); });
  });
  const alive = conns.filter((c) => !c.st.dead).length;
  closedEarly = conns.length - alive;
  await Promise.all(conns.map((c) => c.close()));
  emit({ open: isTcp ? undefined : opt.open, conns: n, ok: conns.length, alive_at_end: alive, closed_early: closedEarly, errors, error_kinds: errKinds, open_seconds: r3(openSec) });
}

async function streams() {
  const n = num(opt.conns, 50), bytes = num(opt.bytes, 8 * MiB);
  const t0 = now();
  const durs = [];
  let errors = 0, total = 0;
  await Promise.all(Array.from({ length: n }, async (_, i) => {
    let got = 0, done;
    const fin = new Promise((r) => (done = r));
    const ts = now();
    try {
      const c = await openRecv(urlFor(i), (k) => { got += k; total += k; if (got >= bytes) done(); }, () => done());
      await fin;
      if (got < bytes) errors++; else durs.push(now() - ts);
      c.close();
    } catch (e) { errors++; }
  }));
  const sec = (now() - t0) / 1000;
  const s = durs.sort((a, b) => a - b);
  emit({ conns: n, bytes_each: bytes, ok: durs.length, errors, seconds: r3(sec), agg_mib_s: r3(total / MiB / sec),
    stream_p50_ms: r3(pct(s, 50)), stream_max_ms: r3(s[s.length - 1] ?? null) });
}


// ready: every id's client waits at once; the harness commits the sessions meanwhile. Raw
// http upgrade (as fastRecv) so the 101's arrival is timed without ws' own bookkeeping.
async function ready() {
  if (isTcp || !ids) throw new Error('ready needs a ws:// URL with {id} and --ids');
  const n = ids.length, waitS = num(opt.wait, 60);
  const res = new Array(n), socks = [];
  let settled = 0, sent = 0, allDone;
  const all = new Promise((r) => (allDone = r));
  const settle = (i, r) => { if (res[i]) return; res[i] = r; if (++settled === n) allDone(); };
  for (let i = 0; i < n; i++) {
    const u = new URL(urlFor(i));
    const req = http.request({ host: u.hostname, port: Number(u.port), path: u.pathname + u.search, agent: false,
      headers: { Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': crypto.randomBytes(16).toString('base64'), 'Sec-WebSocket-Protocol': 'binary' } });
    req.on('error', (e) => settle(i, { ok: false, error: String(e.code || e.message) }));
    req.on('response', (r) => { settle(i, { ok: false, error: 'HTTP ' + r.statusCode }); r.resume(); });
    req.on('upgrade', (r, sock, head) => {
      const t101 = process.hrtime.bigint();
      socks.push(sock);
      sock.on('error', () => {});
      let buf = head && head.length ? Buffer.from(head) : Buffer.alloc(0);
      // The first frame says whether the session was served: data (the VM's banner) or a close.
      const check = () => {
        if (buf.length < 2) return;
        if ((buf[0] & 15) === 8) {
          if (buf.length < 4 && (buf[1] & 127) >= 2) return;
          settle(i, { ok: false, t101, error: 'close ' + ((buf[1] & 127) >= 2 ? buf.readUInt16BE(2) : '') });
        } else settle(i, { ok: true, t101 });
      };
      sock.on('data', (d) => { if (!res[i]) { buf = Buffer.concat([buf, d]); check(); } });
      sock.on('close', () => settle(i, { ok: false, t101, error: 'closed before a frame' }));
      check();
    });
    req.on('finish', () => { if (++sent === n) process.stdout.write(JSON.stringify({ event: 'sent', n }) + '\n'); });
    req.end();
  }
  const timer = setTimeout(allDone, waitS * 1000);
  await all;
  clearTimeout(timer);
  const kinds = {};
  let ok = 0;
  const opens = [];
  for (let i = 0; i < n; i++) {
    const r = res[i] || { ok: false, error: 'no answer within ' + waitS + 's' };
    if (r.ok) ok++; else kinds[r.error] = (kinds[r.error] || 0) + 1;
    opens.push([ids[i], r.t101 === undefined ? null : r.t101.toString(), !!r.ok]);
  }
  const closeFrame = Buffer.from([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]); // masked 1000, zero key
  for (const sock of socks) { if (!sock.destroyed) { sock.write(closeFrame); sock.end(); } }
  emit({ conns: n, ok, errors: n - ok, error_kinds: kinds, opens });
}


// upgrade: relays streaming both ways at a bounded rate while the daemon upgrades. A record is
// [relay u32][seq u32][sent at, ms f64][filler = seq & 255]; both ends are this process, so a
// record's delay is measured on one clock. A relay's pause is its longest delay less its usual
// (median) delay, in either direction: what its user would see as a stall.
class Direction {
  constructor() { this.sent = 0; this.next = 0; this.seen = new Uint8Array(256); this.unique = 0;
    this.dups = 0; this.reordered = 0; this.torn = 0; this.delays = []; this.sentAt = []; this.arrivals = []; this.buf = null; }
  // Whole records out of a byte stream cut anywhere (the daemon frames what it read from the VM).
  feed(data, relay, size, t) {
    let b = this.buf ? Buffer.concat([this.buf, data]) : data;
    let off = 0;
    for (; off + size <= b.length; off += size) {
      const r = b.readUInt32BE(off), seq = b.readUInt32BE(off + 4), at = b.readDoubleBE(off + 8);
      if (r !== relay || b[off + size - 1] !== (seq & 255)) { this.torn++; continue; }
      if (seq >= this.seen.length) { const g = new Uint8Array(Math.max(seq + 1, this.seen.length * 2)); g.set(this.seen); this.seen = g; }
      if (this.seen[seq]) { this.dups++; continue; }
      this.seen[seq] = 1; this.unique++;
      if (seq !== this.next) this.reordered++;
      this.next = seq + 1;
      this.delays.push(t - at); this.sentAt.push(at); this.arrivals.push(t);
    }
    this.buf = off < b.length ? Buffer.from(b.subarray(off)) : null;
  }
}

function record(relay, seq, size) {
  const b = Buffer.alloc(size, seq & 255);
  b.writeUInt32BE(relay, 0); b.writeUInt32BE(seq, 4); b.writeDoubleBE(now(), 8);
  return b;
}

async function upgrade() {
  if (isTcp || !ids) throw new Error('upgrade needs a ws:// URL with {id} and --ids');
  const n = num(opt.conns, ids.length), par = num(opt.parallel, 64), every = num(opt.interval, 50);
  const size = Math.max(17, num(opt.chunk, 32)), vmPort = num(opt['vm-port'], 0);
  const relays = Array.from({ length: n }, (_, i) => ({ i, ws: null, vm: null, up: new Direction(),
    down: new Direction(), closed: null, paired: null }));
  let ending = false;
  // The VMs: a relay's VM end learns its relay from the first record the browser sends.
  const server = net.createServer((sock) => {
    sock.setNoDelay(true);
    let rel = null, pending = null;
    sock.on('data', (d) => {
      const t = now();
      if (!rel) {
        pending = pending ? Buffer.concat([pending, d]) : d;
        if (pending.length < 4) return;
        const i = pending.readUInt32BE(0);
        if (i >= n || relays[i].vm) { sock.destroy(); return; }
        rel = relays[i]; rel.vm = sock; rel.paired();
        d = pending; pending = null;
      }
      rel.up.feed(d, rel.i, size, t);
    });
    sock.on('error', () => {});
    sock.on('close', () => { if (rel && !ending && !rel.closed) rel.closed = 'VM socket closed'; });
  });
  await new Promise((res, rej) => { server.once('error', rej); server.listen({ host: '127.0.0.1', port: vmPort, backlog: 4096 }, res); });
  // The browsers, --parallel at a time; each sends record 0 as soon as it is open (the pairing).
  const t0 = now();
  let next = 0, errors = 0;
  const errKinds = {};
  async function opener() {
    while (next < n) {
      const rel = relays[next++];
      try {
        const paired = new Promise((r) => (rel.paired = r));
        await new Promise((resolve, reject) => {
          const ws = new WebSocket(urlFor(rel.i), ['binary'], { perMessageDeflate: false, maxPayload: 0, handshakeTimeout: 30000 });
          ws.once('error', reject);
          ws.once('unexpected-response', (req, res) => { reject(new Error('HTTP ' + res.statusCode)); ws.terminate(); });
          ws.once('open', () => { ws.removeListener('error', reject); ws.on('error', () => {}); rel.ws = ws; resolve(); });
          ws.on('message', (d) => rel.down.feed(Buffer.isBuffer(d) ? d : Buffer.from(d), rel.i, size, now()));
          ws.on('close', (code) => { if (!ending && !rel.closed) rel.closed = 'close ' + code; if (rel.paired) reject(new Error('closed ' + code)); });
        });
        rel.ws.send(record(rel.i, rel.up.sent++, size), { binary: true });
        const to = setTimeout(() => rel.paired(false), 30000);
        const ok = await paired;
        clearTimeout(to);
        if (ok === false) throw new Error('the VM end never connected');
      } catch (e) { errors++; const k = String(e.code || e.message || e).slice(0, 60); errKinds[k] = (errKinds[k] || 0) + 1; }
    }
  }
  await Promise.all(Array.from({ length: par }, opener));
  const openSec = (now() - t0) / 1000;
  const live = relays.filter((r) => r.ws && r.vm);
  if (live.length < n) {
    emit({ error: `only ${live.length} of ${n} relays opened`, error_kinds: errKinds });
    process.exit(1);
  }
  // Slot s (relay s % n, tick s / n) is due at start + s * every / n: both of its records go then.
  const start = now() + 20;
  let slot = 0, lagMax = 0, sends = 0;
  const cpu0 = process.cpuUsage();
  const pump = setInterval(() => {
    const t = now();
    for (; start + (slot * every) / n <= t; slot++) {
      lagMax = Math.max(lagMax, t - (start + (slot * every) / n));
      const rel = relays[slot % n];
      if (rel.closed) continue;
      rel.ws.send(record(rel.i, rel.up.sent++, size), { binary: true });
      rel.vm.write(record(rel.i, rel.down.sent++, size));
      sends += 2;
    }
  }, 2);
  // The first second warms up (a thousand relays' first records at once): pauses count from
  // then on, when the harness hears that the relays stream.
  const warmup = num(opt.warmup, 1000), steady = start + warmup;
  setTimeout(() => process.stdout.write(JSON.stringify({ event: 'streaming', relays: n, open_seconds: r3(openSec) }) + '\n'), warmup + 20);
  const line = await new Promise((r) => {
    let got = '';
    process.stdin.on('data', (d) => { got += d; if (got.includes('\n')) r(got.trim()); });
    process.stdin.once('end', () => r(got.trim()));
  });
  clearInterval(pump);
  const streamedS = (now() - start) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const [, triggerNs, answerNs] = line.split(/\s+/);
  // hrtime is CLOCK_MONOTONIC, as Python's time.monotonic_ns: the trigger on our clock, in ms.
  const trigger = triggerNs ? Number(BigInt(triggerNs)) / 1e6 : Infinity;
  const answered = answerNs ? Number(BigInt(answerNs)) / 1e6 : Infinity;
  const delivered = () => relays.every((r) => r.closed || (r.up.unique === r.up.sent && r.down.unique === r.down.sent));
  const drainUntil = now() + num(opt.drain, 15) * 1000;
  while (!delivered() && now() < drainUntil) await new Promise((r) => setTimeout(r, 20));
  ending = true;
  // Per relay: the pause (longest delay less median delay), before the trigger (the steady
  // state) and over the whole run; the longest gap between arrivals less the interval; when
  // the worst record was sent, against the trigger.
  const pauses = [], base = [], gaps = [], when = [], allDelays = [];
  // The delays by when the record was sent, in --bucket ms steps from the trigger: where the
  // upgrade's stall sits, and how the steady state looks around it.
  const bucket = num(opt.bucket, 250), buckets = {};
  let lost = 0, dups = 0, reordered = 0, torn = 0, closed = 0, sentTotal = 0, over100 = 0;
  const closeKinds = {};
  for (const r of relays) {
    if (r.closed) { closed++; closeKinds[r.closed] = (closeKinds[r.closed] || 0) + 1; }
    let pause = 0, pauseBase = 0, gap = 0, worstAt = null;
    for (const d of [r.up, r.down]) {
      sentTotal += d.sent;
      lost += d.sent - d.unique; dups += d.dups; reordered += d.reordered; torn += d.torn;
      if (!d.delays.length) continue;
      const counted = d.delays.filter((_, k) => d.sentAt[k] >= steady);
      const sorted = Float64Array.from(counted.length ? counted : d.delays).sort();
      const med = sorted[Math.floor(sorted.length / 2)];
      for (let k = 0; k < d.delays.length; k++) {
        if (d.sentAt[k] < start) continue; // the pairing record
        const b = Math.floor((d.sentAt[k] - trigger) / bucket);
        if (Number.isFinite(b)) (buckets[b] = buckets[b] || []).push(d.delays[k]);
        if (d.sentAt[k] < steady) continue;
        const p = d.delays[k] - med;
        if (p > pause) { pause = p; worstAt = d.sentAt[k] - trigger; }
        if (d.sentAt[k] < trigger && p > pauseBase) pauseBase = p;
        if (k > 0 && d.sentAt[k - 1] >= steady) gap = Math.max(gap, d.arrivals[k] - d.arrivals[k - 1] - every);
      }
      for (const x of counted) allDelays.push(x);
    }
    pauses.push(pause); base.push(pauseBase); gaps.push(gap);
    if (worstAt !== null && Number.isFinite(worstAt)) when.push(worstAt);
    if (pause > 100) over100++;
  }
  for (const a of [pauses, base, gaps, when, allDelays]) a.sort((x, y) => x - y);
  server.close();
  for (const r of relays) { if (r.ws) r.ws.terminate(); if (r.vm) r.vm.destroy(); }
  emit({ conns: n, ok: live.length, errors, error_kinds: errKinds, interval_ms: every, chunk: size,
    open_seconds: r3(openSec), streamed_s: r3(streamedS), records_sent: sentTotal,
    records_per_s: r3(sends / streamedS), client_cpu_s: r3((cpu.user + cpu.system) / 1e6), send_lag_max_ms: r3(lagMax),
    relays_closed: closed, close_kinds: closeKinds, lost, duplicated: dups, reordered, torn,
    delay_p50_ms: r3(pct(allDelays, 50)), delay_p99_ms: r3(pct(allDelays, 99)),
    pause_p50_ms: r3(pct(pauses, 50)), pause_p99_ms: r3(pct(pauses, 99)), pause_max_ms: r3(pauses[pauses.length - 1] ?? null),
    pause_over_100ms: over100,
    baseline_pause_p50_ms: r3(pct(base, 50)), baseline_pause_p99_ms: r3(pct(base, 99)), baseline_pause_max_ms: r3(base[base.length - 1] ?? null),
    gap_pause_p50_ms: r3(pct(gaps, 50)), gap_pause_p99_ms: r3(pct(gaps, 99)), gap_pause_max_ms: r3(gaps[gaps.length - 1] ?? null),
    worst_sent_after_trigger_p50_ms: r3(pct(when, 50)), worst_sent_after_trigger_min_ms: r3(when[0] ?? null),
    worst_sent_after_trigger_max_ms: r3(when[when.length - 1] ?? null),
    timeline: Object.keys(buckets).map(Number).sort((a, b) => a - b).map((b) => {
      const v = buckets[b].sort((x, y) => x - y);
      return [b * bucket, v.length, r3(pct(v, 50)), r3(pct(v, 99)), r3(v[v.length - 1])];
    }),
    trigger_to_answer_ms: Number.isFinite(answered - trigger) ? r3(answered - trigger) : null });
}

// soak: a long run of short relays; what each connection ended as, by what the client saw.
const cutIds = opt['cut-ids'] ? require('fs').readFileSync(opt['cut-ids'], 'utf8').split('\n').map((x) => x.trim()).filter(Boolean) : null;
function soakKind(i) {
  if (i % 10 === 3) return 'unknown';
  if (i % 10 === 7) return Math.floor(i / 10) % 2 ? 'cut_vm' : 'cut_browser';
  return 'serve';
}
function soakOne(i, bytes, payload) {
  const kind = soakKind(i);
  const sid = kind === 'unknown' ? crypto.randomUUID() : kind === 'cut_vm' ? cutIds[i % cutIds.length] : ids[i % ids.length];
  const url = opt.url.replace('{id}', sid);
  return new Promise((resolve) => {
    let got = 0, done = false, conn = null;
    const finish = (o) => { if (!done) { done = true; clearTimeout(t); resolve(o); } };
    const t = setTimeout(() => { if (conn) conn.destroy(); finish('timeout ' + kind); }, 30000);
    const onData = (d) => {
      got += d.length;
      if (kind === 'cut_browser' && got >= bytes / 4) { conn.destroy(); finish('cut_browser'); }
      else if (kind === 'serve' && got >= bytes) conn.close().then(() => finish(got === bytes ? 'served' : 'too many bytes'));
    };
    const onClose = (code) => {
      // Refused after the 101 (unknown session at the deadline, database unavailable).
      if (got === 0 && (code === 4404 || code === 4503 || code === 4504)) finish('refused_' + code);
      else if (kind === 'cut_vm') finish('cut_vm');
      else if (!(kind === 'serve' && got >= bytes)) finish('closed ' + code + ' ' + kind);
    };
    rawOpen(url, onData, onClose).then((c) => {
      conn = c;
      for (let off = 0; off < bytes; off += 16384) c.send(payload.subarray(off, Math.min(bytes, off + 16384)));
    }, (e) => {
      const m = /^HTTP (\d+)/.exec(e.message);
      finish(m ? 'refused_' + m[1] : 'error ' + (e.code || e.message) + ' ' + kind);
    });
  });
}
async function soak() {
  if (isTcp || !ids || !cutIds) throw new Error('soak needs a ws:// URL with {id}, --ids and --cut-ids');
  const n = num(opt.conns, 1000), bytes = num(opt.bytes, 65536), every = num(opt.progress, 10000);
  const payload = Buffer.alloc(bytes, 's');
  const tally = {}, t0 = now();
  let done = 0;
  const count = (o) => {
    tally[o] = (tally[o] || 0) + 1;
    if (++done % every === 0 || done === n) process.stdout.write(JSON.stringify({ event: 'progress', done }) + '\n');
  };
  // Two pools: unknown sessions wait out the daemon's deadline, the rest take milliseconds.
  let nextServe = 0, nextUnknown = 0;
  let limit = 0;
  const take = (unknown) => {
    for (;;) {
      const i = unknown ? nextUnknown : nextServe;
      if (i >= limit) return null;
      if (unknown) nextUnknown++; else nextServe++;
      if ((soakKind(i) === 'unknown') === unknown) return i;
    }
  };
  const worker = async (unknown) => { for (let i = take(unknown); i !== null; i = take(unknown)) count(await soakOne(i, bytes, payload)); };
  // Up to --pause-at, then (every connection ended) {"event":"paused"} and a line on stdin
  // before the rest: the harness measures the idle daemon there and at the end.
  const pauseAt = Math.min(n, num(opt['pause-at'], n));
  for (const end of pauseAt < n ? [pauseAt, n] : [n]) {
    limit = end;
    await Promise.all([
      ...Array.from({ length: num(opt.parallel, 64) }, () => worker(false)),
      ...Array.from({ length: num(opt['unknown-parallel'], 256) }, () => worker(true)),
    ]);
    if (end < n) {
      process.stdout.write(JSON.stringify({ event: 'paused', done }) + '\n');
      await new Promise((r) => process.stdin.once('data', r));
    }
  }
  const sec = (now() - t0) / 1000;
  emit({ conns: n, tally, seconds: r3(sec), conn_per_s: r3(n / sec) });
}

const fns = { soak, down, 'down-vnc': downVnc, up, echo, setup, conc, streams, ready, upgrade };
if (!fns[scenario] || !opt.url) {
  console.error('usage: node client.js down|down-vnc|up|echo|setup|conc|streams|ready|upgrade|soak --url ws://...|tcp://... [--ids FILE] [options]');
  process.exit(2);
}
// Exit once stdout is flushed: a result line longer than the pipe's 64 KiB (scale's opens)
// would otherwise be cut short by the exit.
const exitAfterFlush = (code) => process.stdout.write('', () => process.exit(code));
fns[scenario]().then(() => exitAfterFlush(0), (e) => { emit({ error: String(e && e.message || e) }); exitAfterFlush(1); });
