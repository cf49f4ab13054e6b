#!/usr/bin/env node
// Closed-loop echo over plain WebSockets (the `ws` package) for the raw aiohttp WebSocket baseline, which cannot speak
// Socket.IO: --sessions connections, each sends its next message when the echo of the previous one arrives.
// Prints one JSON line: msgs/s in the measured window, round-trip latency, server CPU %.
import { parseArgs, peerModule, now, round, measureWindow, summary, emitResult } from './common.mjs';

const args = parseArgs();
const WebSocket = peerModule('ws');
const URL_ = (args.url || 'http://127.0.0.1:3305').replace(/\/$/, '').replace(/^http/, 'ws') + '/ws';
const S = +(args.sessions || 100);
const DUR = +(args.duration || 8) * 1000;
const WARM = +(args.warmup ?? 2) * 1000;
const SPID = +(args['server-pid'] || 0);
const PAD = 'x'.repeat(32);

const state = { running: true, recording: false }; let replies = 0; const lat = [];
const open = () => new Promise((resolve, reject) => { const w = new WebSocket(URL_); w.once('open', () => resolve(w)); w.once('error', reject); });
const socks = await Promise.all(Array.from({ length: S }, open));
socks.forEach((ws, i) => {
  let t0 = 0; let n = 0;
  const send = () => { t0 = now(); ws.send(JSON.stringify({ session: i, n: n++, message: `hello ${PAD}` })); };
  ws.on('message', () => { if (state.recording) { replies++; lat.push(now() - t0); } if (state.running) send(); });
  send();
});
const { secs, cpu } = await measureWindow(WARM, DUR, SPID, state);
for (const ws of socks) ws.terminate();
emitResult({ driver: 'ws_echo', url: URL_, sessions: S, measuredSecs: round(secs), repliesPerSec: round(replies / secs, 1),
  latencyMs: summary(lat), cpuPct: cpu, extensions: socks[0].extensions || '', at: new Date().toISOString() });
