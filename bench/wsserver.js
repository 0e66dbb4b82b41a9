'use strict';
// The bench's direct WebSocket server (copied from shared/tools/wsbench): target.c's modes, spoken
// over WebSocket.
// Used (a) as the "client ceiling" peer (client -> this server, no proxy hop) and
// (b) as the backend behind a WebSocket pass-through proxy such as nginx.
//
//   node wsserver.js MODE PORT [BYTES] [MSGSIZE]
//   MODE: source | sink | echo | banner   (see target.c)
// Binds 127.0.0.1 only. Accepts any path. Picks subprotocol "binary" when offered.
const { WebSocketServer } = require('ws');

const [mode, portS, bytesS, msgS] = process.argv.slice(2);
const port = Number(portS);
const nbytes = bytesS !== undefined ? Number(bytesS) : (mode === 'sink' ? 0 : 256 * 1048576);
const msgSize = Number(msgS || 65536);
if (!['source', 'sink', 'echo', 'banner'].includes(mode) || !port) {
  console.error('usage: node wsserver.js source|sink|echo|banner PORT [BYTES] [MSGSIZE]');
  process.exit(2);
}

const http = require('http');
const crypto = require('crypto');
const wss = new WebSocketServer({
  noServer: true, perMessageDeflate: false, maxPayload: 0,
  handleProtocols: (protos) => (protos.has('binary') ? 'binary' : false),
});
const server = http.createServer((req, res) => { res.writeHead(426); res.end(); });
server.on('upgrade', (req, sock, head) => {
  if (mode === 'banner') return rawBanner(req, sock);
  if (mode !== 'sink') return wss.handleUpgrade(req, sock, head, (ws) => wss.emit('connection', ws, req));
  // Fast sink: own handshake, then parse frame headers and count payload bytes without
  // unmasking (the ack only needs the count), so this server is not the upload bottleneck.
  const key = req.headers['sec-websocket-key'];
  const accept = crypto.createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  const proto = /(^|,)\s*binary\s*(,|$)/.test(req.headers['sec-websocket-protocol'] || '') ? 'Sec-WebSocket-Protocol: binary\r\n' : '';
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' + accept + '\r\n' + proto + '\r\n');
  sock.setNoDelay(true);
  conns++;
  let got = 0, acked = false, hb = Buffer.alloc(14), hn = 0, need = 2, left = 0, op = 0, inPayload = false;
  const feed = (b) => {
    let off = 0;
    while (off < b.length) {
      if (inPayload) {
        const n = Math.min(left, b.length - off);
        if (op < 8) { got += n; bytesIn += n; }
        off += n; left -= n;
        if (left === 0) { inPayload = false; hn = 0; need = 2; if (op === 8) { sock.end(Buffer.from([0x88, 0])); } }
        continue;
      }
      while (hn < need && off < b.length) hb[hn++] = b[off++];
      if (hn < need) break;
      if (need === 2) {
        const l7 = hb[1] & 127, m = hb[1] & 128 ? 4 : 0;
        need = 2 + (l7 === 126 ? 2 : l7 === 127 ? 8 : 0) + m;
        if (need > 2) continue;
      }
      op = hb[0] & 15; const l7 = hb[1] & 127;
      left = l7 === 126 ? hb.readUInt16BE(2) : l7 === 127 ? Number(hb.readBigUInt64BE(2)) : l7;
      if (left === 0) { hn = 0; need = 2; if (op === 8) sock.end(Buffer.from([0x88, 0])); } else inPayload = true;
    }
    if (!acked && nbytes > 0 && got >= nbytes) { acked = true; sock.write(Buffer.from([0x82, 1, 0x4b])); }
  };
  sock.on('data', feed);
  sock.on('error', () => {});
  if (head && head.length) feed(head);
});
// Fast banner: the handshake by hand, the banner as one binary frame, and an echoed close when
// the client closes, so the connection-rate ceiling (setup, conc) is the client's, not ws'.
function rawBanner(req, sock) {
  const key = req.headers['sec-websocket-key'] || '';
  const accept = crypto.createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  const proto = /(^|,)\s*binary\s*(,|$)/.test(req.headers['sec-websocket-protocol'] || '') ? 'Sec-WebSocket-Protocol: binary\r\n' : '';
  conns++;
  sock.setNoDelay(true);
  sock.on('error', () => {});
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' +
    accept + '\r\n' + proto + '\r\n');
  sock.write(Buffer.concat([Buffer.from([0x82, 12]), Buffer.from('RFB 003.008\n')]));
  bytesOut += 12;
  // Clients send nothing but a close frame: answer it and end.
  sock.on('data', (d) => { bytesIn += d.length; if ((d[0] & 15) === 8) sock.end(Buffer.from([0x88, 2, 0x03, 0xe8])); });
}
server.listen({ host: '127.0.0.1', port, backlog: 4096 }, () => console.log(`LISTENING ${port}`));
let conns = 0, bytesIn = 0, bytesOut = 0;
const chunk = Buffer.alloc(msgSize, 'x');
function frameHeader(n) {
  if (n < 126) return Buffer.from([0x82, n]);
  if (n < 65536) { const h = Buffer.from([0x82, 126, 0, 0]); h.writeUInt16BE(n, 2); return h; }
  const h = Buffer.alloc(10); h[0] = 0x82; h[1] = 127; h.writeBigUInt64BE(BigInt(n), 2); return h;
}
const frame = Buffer.concat([frameHeader(msgSize), chunk]);
const block = Buffer.concat(Array.from({ length: 16 }, () => frame));

wss.on('connection', (ws) => {
  conns++;
  ws._socket.setNoDelay(true);
  ws.on('error', () => {});
  if (mode === 'source') {
    // Fast path: write pre-built unmasked binary frames straight to the socket (16 frames of
    // msgSize per write), so this server is never the bottleneck for the downstream test.
    const sock = ws._socket;
    let left = nbytes;
    const pump = () => {
      while (left > 0) {
        let ok;
        if (left >= 16 * msgSize) { ok = sock.write(block); left -= 16 * msgSize; bytesOut += 16 * msgSize; }
        else { const n = Math.min(left, msgSize); ok = sock.write(Buffer.concat([frameHeader(n), chunk.subarray(0, n)])); left -= n; bytesOut += n; }
        if (!ok) return sock.once('drain', pump);
      }
      ws.close(1000);
    };
    pump();
  } else if (mode === 'sink') {
    let got = 0, acked = false;
    ws.on('message', (d) => {
      got += d.length; bytesIn += d.length;
      if (!acked && nbytes > 0 && got >= nbytes) { acked = true; ws.send(Buffer.from('K'), { binary: true }); }
    });
  } else if (mode === 'echo') {
    ws.on('message', (d) => { bytesIn += d.length; bytesOut += d.length; ws.send(d, { binary: true }); });
  } else {
    ws.send(Buffer.from('RFB 003.008\n'), { binary: true });
    ws.on('message', (d) => { bytesIn += d.length; });
  }
});
const stop = () => {
  console.log(JSON.stringify({ target_mode: mode, connections: conns, bytes_in: bytesIn, bytes_out: bytesOut }));
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
