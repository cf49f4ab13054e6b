// Proves compatibility with the official JavaScript client: join, send, receive a streamed reply.
// Usage: node tests/js/node_client.mjs <serverUrl>   (prints one JSON line with what it saw)
import { io } from 'socket.io-client';

const url = process.argv[2];
const socket = io(url, { transports: ['websocket'], reconnection: false, timeout: 5000 });
const seen = { chunks: [], joined: null, reply: null, ack: null, join: null };
const fail = (why) => { console.log(JSON.stringify({ error: String(why), seen })); process.exit(1); };
setTimeout(() => fail('timeout'), 15000);

socket.on('connect_error', fail);
socket.on('chat-joined', (payload) => { seen.joined = payload; });
socket.on('message-chunk', (chunk) => { seen.chunks.push(chunk); });
socket.on('message-received', (payload) => {
  if (payload.message.role === 'user') return;
  seen.reply = payload;
  socket.close();
  console.log(JSON.stringify(seen));
  process.exit(0);
});
socket.on('connect', async () => {
  seen.join = await socket.timeout(5000).emitWithAck('join-chat', { userId: 'node-client' });
  seen.ack = await socket.timeout(5000).emitWithAck('send-message', {
    sessionId: seen.join.sessionId, message: 'hello from node', clientMessageId: 'node-1',
  });
});
