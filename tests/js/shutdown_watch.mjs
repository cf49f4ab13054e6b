// Joins a chat, says "ready", then reports how the server's shutdown reached it: the disconnect reason and
// whether socket.io-client would reconnect by itself (it does for transport errors, not for a server kick).
import { io } from 'socket.io-client';

const url = process.argv[2];
const transports = (process.argv[3] || 'websocket').split(',');
const socket = io(url, { transports, reconnection: false });
const started = Date.now();
socket.on('connect', () => {
  socket.emit('join-chat', { userId: 'watching-the-shutdown' }, (ack) => {
    if (!ack.ok) { console.log(JSON.stringify({ error: ack })); process.exit(1); }
    console.log('ready');
  });
});
socket.on('disconnect', (reason) => {
  console.log(JSON.stringify({ reason, active: socket.active, at: Date.now() }));
  process.exit(0);
});
setTimeout(() => { console.log(JSON.stringify({ timeout: Date.now() - started })); process.exit(2); }, 60000);
