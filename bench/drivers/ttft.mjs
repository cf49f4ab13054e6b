#!/usr/bin/env node
// B5: time to first token, one session, sequential requests: send-message -> first `message-chunk` of the answer;
// the next request goes when `message-received` closes the answer. Prints one JSON line with every request's figure.
import { parseArgs, now, round, connectSocketIO, emitAck, emitResult } from './common.mjs';

const args = parseArgs();
const URL_ = (args.url || 'http://127.0.0.1:3301').replace(/\/$/, '');
const N = +(args.requests || 21);
const TIMEOUT = +(args.timeout || 30) * 1000;

const sock = await connectSocketIO(URL_);
const joined = await emitAck(sock, 'join-chat', { userId: 'ttft-user' });
const requests = [];
for (let i = 0; i < N; i++) {
  const r = await new Promise((resolve) => {
    const t0 = now(); let first = null; let provider = null;
    const onChunk = (ev) => { if (first === null) { first = now() - t0; provider = ev.provider || null; } };
    const done = (ev, timedOut = false) => {
      clearTimeout(timer); sock.off('message-chunk', onChunk); sock.off('message-received', onReply);
      resolve({ ttftMs: first === null ? null : round(first), totalMs: round(now() - t0), provider,
        role: ev && ev.message ? ev.message.role : null, timedOut });
    };
    const onReply = (ev) => { const role = ev && ev.message && ev.message.role; if (role === 'assistant' || role === 'system') done(ev); };
    const timer = setTimeout(() => done(null, true), TIMEOUT);
    sock.on('message-chunk', onChunk); sock.on('message-received', onReply);
    sock.emit('send-message', { sessionId: joined.sessionId, message: `ttft probe ${i}`, clientMessageId: `t${i}` });
  });
  requests.push(r);
}
sock.close();
emitResult({ driver: 'ttft', url: URL_, requests, at: new Date().toISOString() });
