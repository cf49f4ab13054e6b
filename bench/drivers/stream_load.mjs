#!/usr/bin/env node
// B4: streaming fan-out. --sessions joined sockets, each sends its next message when `message-received` (the end of
// the streamed answer) arrives, so that many answers stream at once for the whole run. Counts `message-chunk` events
// (the events the server pushes while an answer is written) in the measured window.
// Prints one JSON line: chunk events/s in total and per stream, streamed chars/s per stream, server CPU %.
import { parseArgs, now, round, measureWindow, summary, connectSocketIO, emitAck, emitResult } from './common.mjs';

const args = parseArgs();
const URL_ = (args.url || 'http://127.0.0.1:3301').replace(/\/$/, '');
const S = +(args.sessions || 100);
const DUR = +(args.duration || 8) * 1000;
const WARM = +(args.warmup ?? 3) * 1000;
const SPID = +(args['server-pid'] || 0);

const c = { chunks: 0, chars: 0, replies: 0, typing: 0, errors: 0, ackErrors: 0 };
const state = { recording: false, running: true }; let seq = 0;
const gaps = []; // ms between consecutive chunks of one stream
const sessions = [];
for (let i = 0; i < S; i += 50) { // join in batches of 50
  sessions.push(...await Promise.all(Array.from({ length: Math.min(50, S - i) }, async (_, j) => {
    const sock = await connectSocketIO(URL_);
    const res = await emitAck(sock, 'join-chat', { userId: `stream-user-${i + j}` });
    return { sock, id: res.sessionId, last: 0, streaming: false };
  })));
}
for (const s of sessions) {
  const send = () => {
    s.last = 0;
    s.sock.emit('send-message', { sessionId: s.id, message: `stream ${++seq} please`, clientMessageId: `s${seq}` },
      (res) => { if (!res || res.ok === false) c.ackErrors++; });
  };
  s.sock.on('message-chunk', (ev) => {
    const t = now();
    if (state.recording) { c.chunks++; c.chars += (ev.delta || '').length; if (s.last) gaps.push(t - s.last); }
    s.last = t;
  });
  s.sock.on('assistant-typing', () => { if (state.recording) c.typing++; });
  s.sock.on('chat-error', () => { c.errors++; });
  s.sock.on('message-received', (ev) => {
    const role = ev && ev.message && ev.message.role;
    if (role !== 'assistant' && role !== 'system') return;
    if (state.recording) c.replies++;
    if (state.running) send();
  });
  send();
}
const { secs, cpu } = await measureWindow(WARM, DUR, SPID, state);
for (const s of sessions) s.sock.close();
emitResult({ driver: 'stream_load', url: URL_, sessions: sessions.length, measuredSecs: round(secs),
  chunkEventsPerSec: round(c.chunks / secs, 1), chunkEventsPerSecPerStream: round(c.chunks / secs / sessions.length, 2),
  charsPerSecPerStream: round(c.chars / secs / sessions.length, 1), repliesPerSec: round(c.replies / secs, 2),
  chunkGapMs: summary(gaps), cpuPct: cpu, counts: c, at: new Date().toISOString() });
