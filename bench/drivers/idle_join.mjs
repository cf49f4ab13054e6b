#!/usr/bin/env node
// B1: hold N idle connections and read the server's RSS at each level.
//   --protocol socketio (default): connect (websocket transport) + join-chat {userId}, records the join ack latency
//   --protocol ws: a plain WebSocket (the `ws` package, offering permessage-deflate like browsers), records connect latency
// Levels are cumulative (--levels 1000,5000,10000): open up to each level with --concurrency in flight, wait --settle s,
// read VmRSS of --server-pid. Before the base reading, --warm sockets are opened and closed (one-time lazy costs).
// Prints one JSON line on stdout.
import { parseArgs, peerModule, sleep, now, round, rssKB, cpuMeter, summary, connectSocketIO, emitAck,
  negotiatedExtensions, emitResult } from './common.mjs';

const args = parseArgs();
const URL_ = (args.url || 'http://127.0.0.1:3301').replace(/\/$/, '');
const PROTO = args.protocol || 'socketio';
const LEVELS = (args.levels || '1000,5000,10000').split(',').map(Number).filter((n) => n > 0).sort((a, b) => a - b);
const CONC = +(args.concurrency || 50);
const SETTLE = +(args.settle || 2) * 1000;
const WARM = +(args.warm || 50);
const SPID = +(args['server-pid'] || 0);

let seq = 0; let extensions = null;
async function openOne() {
  const i = seq++;
  if (PROTO === 'ws') {
    const WebSocket = peerModule('ws');
    const t0 = now();
    const ws = await new Promise((resolve, reject) => {
      const w = new WebSocket(URL_.replace(/^http/, 'ws') + '/ws');
      w.once('open', () => resolve(w)); w.once('error', reject);
    });
    if (extensions === null) extensions = ws.extensions || '';
    return { close: () => ws.terminate(), connectMs: now() - t0, joinMs: null };
  }
  const t0 = now();
  const sock = await connectSocketIO(URL_);
  const t1 = now();
  const res = await emitAck(sock, 'join-chat', { userId: `idle-user-${i}` });
  if (!res || res.ok === false || !res.sessionId) { sock.close(); throw new Error(`join failed: ${JSON.stringify(res)}`); }
  if (extensions === null) extensions = negotiatedExtensions(sock);
  return { close: () => sock.close(), connectMs: t1 - t0, joinMs: now() - t1 };
}

async function openMany(n, into, stage) {
  let next = 0; let failed = 0;
  async function worker() {
    while (next < n) {
      next++;
      try { const c = await openOne(); into.push(c); stage.connect.push(c.connectMs); if (c.joinMs !== null) stage.join.push(c.joinMs); } catch (e) { failed++; if (failed <= 3) console.error('open failed:', e.message); }
    }
  }
  await Promise.all(Array.from({ length: Math.min(CONC, n) }, worker));
  return failed;
}

const warm = [];
await openMany(WARM, warm, { connect: [], join: [] });
for (const c of warm) c.close();
await sleep(SETTLE);
const baseKB = rssKB(SPID);
const held = []; const levels = []; const allJoin = []; const allConnect = []; let failures = 0;
for (const level of LEVELS) {
  const stage = { connect: [], join: [] };
  const t0 = now();
  failures += await openMany(level - held.length, held, stage);
  const openSecs = (now() - t0) / 1000;
  await sleep(SETTLE);
  const meter = cpuMeter(SPID); meter.start(); await sleep(1000); const idleCpu = meter.stop();
  const kb = rssKB(SPID);
  allJoin.push(...stage.join); allConnect.push(...stage.connect);
  levels.push({ requested: level, open: held.length, rssMB: round(kb / 1024, 1), kbPerConnection: held.length ? round((kb - baseKB) / held.length, 1) : null,
    openSecs: round(openSecs), joinMs: summary(stage.join), connectMs: summary(stage.connect), idleCpuPct: idleCpu.server });
  console.error(`level ${level}: open ${held.length}, rss ${round(kb / 1024, 1)} MB`);
}
for (const c of held) c.close();
emitResult({ driver: 'idle_join', protocol: PROTO, url: URL_, concurrency: CONC, baseRssMB: round(baseKB / 1024, 1),
  extensions, failures, levels, joinMs: summary(allJoin), connectMs: summary(allConnect), at: new Date().toISOString() });
