// Shared helpers for the bench drivers: argument parsing, the peer's node_modules, /proc readings, percentiles.
// The drivers run on the load core; they load socket.io-client and ws from the Node peer's installed copy
// (PEER_DIR, default /tmp/support-chat-peer), so the client stack is the one load.js uses.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { performance } from 'node:perf_hooks';

export function parseArgs(argv = process.argv.slice(2)) {
  const args = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) continue;
    const k = a.slice(2); const v = argv[i + 1];
    if (v === undefined || v.startsWith('--')) args[k] = 'true'; else { args[k] = v; i++; }
  }
  return args;
}

const peerRequire = createRequire(path.join(process.env.PEER_DIR || '/tmp/support-chat-peer', 'package.json'));
export const peerModule = (name) => peerRequire(name);

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const now = () => performance.now();
export const round = (x, d = 2) => (x === null || !Number.isFinite(x) ? null : Math.round(x * 10 ** d) / 10 ** d);

export function cpuTicks(pid) { // utime + stime in clock ticks (100/s)
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return +f[11] + +f[12];
  } catch { return NaN; }
}

export function rssKB(pid) {
  try { return +/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1]; } catch { return NaN; }
}

export function cpuMeter(pid) { // start() then stop() -> % of one core used by pid (and by this driver)
  let t0 = 0; let c0 = 0; let s0 = null;
  return {
    start() { t0 = now(); c0 = cpuTicks(pid); s0 = process.cpuUsage(); },
    stop() {
      const secs = (now() - t0) / 1000; const self = process.cpuUsage(s0);
      return { server: round(((cpuTicks(pid) - c0) / 100 / secs) * 100, 1), driver: round(((self.user + self.system) / 1e6 / secs) * 100, 1) };
    },
  };
}

// A closed-loop run's window: warm up, then measure for durMs with state.recording set; afterwards state.running is
// false so no new message is sent. Returns the measured seconds and the CPU use of pid and of this driver.
export async function measureWindow(warmMs, durMs, pid, state) {
  await sleep(warmMs);
  state.recording = true; const meter = cpuMeter(pid); meter.start(); const t0 = now();
  await sleep(durMs);
  state.recording = false; state.running = false;
  return { secs: (now() - t0) / 1000, cpu: meter.stop() };
}

export function summary(values) {
  const s = Float64Array.from(values).sort();
  const pct = (p) => (s.length ? round(s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]) : null);
  return { n: s.length, p50: pct(50), p95: pct(95), p99: pct(99), max: pct(100),
    mean: s.length ? round(s.reduce((a, b) => a + b, 0) / s.length) : null };
}

export function connectSocketIO(url) { // websocket transport only, like load.js (the client offers permessage-deflate)
  const { io } = peerModule('socket.io-client');
  return new Promise((resolve, reject) => {
    const sock = io(url, { transports: ['websocket'], forceNew: true, reconnection: false, timeout: 30000 });
    const t = setTimeout(() => { sock.close(); reject(new Error('connect timeout')); }, 30000);
    sock.once('connect', () => { clearTimeout(t); resolve(sock); });
    sock.once('connect_error', (e) => { clearTimeout(t); sock.close(); reject(e); });
  });
}

export function emitAck(sock, ev, payload, ms = 30000) {
  return new Promise((resolve, reject) => {
    sock.timeout(ms).emit(ev, payload, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

export function negotiatedExtensions(sock) { // what the server accepted of the client's permessage-deflate offer
  try { return sock.io.engine.transport.ws.extensions || ''; } catch { return null; }
}

export function emitResult(out) { console.error(JSON.stringify(out, null, 1)); console.log(JSON.stringify(out)); setTimeout(() => process.exit(0), 200); }
