// The agent console: sign in with an agent key, see the queue, claim, talk, hand back or close.
import { AGENT_KEY_STORE, byId as $, citedText, loadClient, setStatus as setPill, sourcesList, toast } from './ui.js';

const RETRY_BASE_MS = 1000;
const RETRY_MAX_MS = 5000;
const state = {
  io: null, socket: null, key: sessionStorage.getItem(AGENT_KEY_STORE), current: null, shown: new Set(), retries: 0, retryTimer: null,
};

function setStatus(name, label) {
  setPill('agent-status', name, label);
}

// Bidi embeddings, overrides and isolates (U+202A-202E, U+2066-2069) could reorder what an agent reads.
const BIDI_CONTROLS = /[\u202A-\u202E\u2066-\u2069]/g;

// Text as text, never HTML, with bidi controls dropped and its direction isolated from what surrounds it.
function text(tag, cls, content) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  el.dir = 'auto';
  el.textContent = String(content ?? '').replace(BIDI_CONTROLS, '');
  return el;
}

// Every message as text, never HTML.
function showMessage(message) {
  if (message.id && state.shown.has(message.id)) return;
  if (message.id) state.shown.add(message.id);
  const li = document.createElement('li');
  li.className = 'msg';
  li.dataset.role = message.role;
  const bubble = document.createElement('div');
  bubble.className = 'bubble';
  const body = text('div', 'msg-text', message.content || '');
  bubble.append(body);
  if (message.role === 'assistant' && message.sources?.length) {
    // The knowledge-base entries the answer used, so the agent sees what the customer was told and from where.
    const anchor = `agent-src-${message.id || state.shown.size}`;
    citedText(body, body.textContent, message.sources, anchor);
    bubble.append(sourcesList(message.sources, anchor));
  }
  const who = { user: 'Customer', assistant: `Assistant${message.provider ? ` (${message.provider})` : ''}`, agent: message.agentName || 'Agent', system: 'System' }[message.role];
  li.append(bubble, text('div', 'meta', `${who} · ${message.createdAt ? new Date(message.createdAt).toLocaleTimeString() : ''}`));
  $('transcript').append(li);
  $('transcript').scrollTop = $('transcript').scrollHeight;
}

function renderQueue(queue) {
  $('queue-count').textContent = String(queue.length);
  $('queue').replaceChildren(...queue.map((entry) => {
    const li = document.createElement('li');
    li.className = 'queue-entry';
    const language = entry.language ? ` · ${entry.language.toUpperCase()}` : '';
    li.append(text('span', 'trigger', `${entry.trigger} · ${entry.userId || 'visitor'}${language}`));
    li.append(text('span', '', entry.reason || ''));
    for (const p of entry.preview || []) li.append(text('span', 'muted', `${p.role}: ${p.content}`));
    if (entry.summary) li.append(text('span', '', `Summary: ${entry.summary}`));
    li.append(text('span', 'muted', `waiting since ${new Date(entry.waitingSince).toLocaleTimeString()}`));
    const claim = text('button', 'claim', 'Claim');
    claim.type = 'button';
    claim.addEventListener('click', () => claimSession(entry.sessionId));
    li.append(claim);
    return li;
  }));
}

async function call(event, payload) {
  const ack = await state.socket.timeout(10000).emitWithAck(event, payload).catch(() => null);
  if (!ack) { toast('No answer from the server.'); return null; }
  if (!ack.ok) { toast(ack.error.message); return null; }
  return ack;
}

async function claimSession(sessionId) {
  const ack = await call('claim', { sessionId });
  if (!ack) return;
  state.current = sessionId;
  state.shown.clear();
  $('transcript').replaceChildren();
  $('conv-session').textContent = sessionId.slice(0, 8);
  const info = $('handoff-info');
  const language = ack.language ? ` (visitor writes ${ack.language.toUpperCase()})` : '';
  info.textContent = `Escalated by ${ack.trigger}${language}: ${ack.reason || ''} — ${ack.summary || ''}`.replace(BIDI_CONTROLS, '');
  info.hidden = false;
  ack.transcript.forEach(showMessage);
  setHolding(true);
}

function setHolding(holding) {
  for (const id of ['agent-reply', 'agent-send', 'release', 'close']) $(id).disabled = !holding;
  if (holding) $('agent-reply').focus();
}

function endConversation() {
  state.current = null;
  setHolding(false);
  $('handoff-info').hidden = true;
}

async function loadTickets() {
  const response = await fetch('/api/v1/tickets', { headers: { Authorization: `Bearer ${state.key}` } }).catch(() => null);
  if (!response || !response.ok) return;
  const { tickets } = await response.json();
  $('tickets').replaceChildren(...tickets.map((t) => {
    const li = document.createElement('li');
    li.className = 'queue-entry';
    li.append(text('span', 'trigger', `${t.id} · ${t.status}`));
    li.append(text('span', '', t.contact ? t.contact.email : 'no contact yet'));
    li.append(text('span', 'muted', t.summary || t.reason || ''));
    if (t.status === 'open') {
      const resolve = text('button', 'small', 'Resolve');
      resolve.type = 'button';
      resolve.addEventListener('click', async () => {
        await fetch(`/api/v1/tickets/${encodeURIComponent(t.id)}/resolve`, {
          method: 'POST',
          headers: { Authorization: `Bearer ${state.key}`, 'Content-Type': 'application/json' },
          body: JSON.stringify({ resolution: 'Resolved from the console' }),
        });
        loadTickets();
      });
      li.append(resolve);
    }
    return li;
  }));
}

// The server answered the namespace connect with "unauthorized": the key itself is wrong, retrying cannot help.
function keyRefused(err) {
  return Boolean(err && err.data && err.data.code === 'unauthorized');
}

function showSignedIn(signedIn) {
  $('sign-in').hidden = signedIn;
  $('sign-out').hidden = !signedIn;
}

function refuse(socket, err) {
  clearTimeout(state.retryTimer);
  setStatus('offline', 'Sign-in refused');
  toast(err.data.message || 'Could not connect with that key.');
  sessionStorage.removeItem(AGENT_KEY_STORE);
  state.key = null;
  socket.close();
  showSignedIn(false);
  endConversation();
}

// socket.io-client retries transport failures by itself, but not a connect the server answered with an error or
// a disconnect the server asked for: those are retried here, with the same kind of capped, jittered backoff.
function retryLater(socket) {
  clearTimeout(state.retryTimer);
  const delay = Math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ** state.retries) * (0.5 + Math.random());
  state.retries += 1;
  state.retryTimer = setTimeout(() => { if (state.socket === socket && !socket.connected) socket.connect(); }, delay);
}

function reconnecting(attempt) {
  setStatus('reconnecting', attempt ? `Reconnecting… (attempt ${attempt})` : 'Reconnecting…');
}

function connect() {
  if (state.socket) state.socket.close();
  clearTimeout(state.retryTimer);
  state.retries = 0;
  setStatus('connecting', 'Connecting…');
  const socket = state.io('/agents', {
    auth: { key: state.key },
    transports: ['websocket', 'polling'],
    reconnection: true,
    reconnectionDelay: RETRY_BASE_MS,
    reconnectionDelayMax: RETRY_MAX_MS,
  });
  state.socket = socket;
  socket.on('connect', async () => {
    clearTimeout(state.retryTimer);
    state.retries = 0;
    setStatus('connected', 'Signed in');
    showSignedIn(true);
    sessionStorage.setItem(AGENT_KEY_STORE, state.key);
    const ack = await call('get-queue', {});
    if (ack) renderQueue(ack.queue);
    loadTickets();
  });
  socket.on('connect_error', (err) => {
    if (keyRefused(err)) { refuse(socket, err); return; }
    // Unreachable, restarting or refusing for another reason: keep the key and keep trying.
    reconnecting();
    if (!socket.active) retryLater(socket);
  });
  socket.io.on('reconnect_attempt', reconnecting);
  socket.on('disconnect', (reason) => {
    if (reason === 'io client disconnect') return;
    reconnecting();
    if (!socket.active) retryLater(socket);
  });
  socket.on('queue-updated', (e) => renderQueue(e.queue));
  socket.on('message-received', (e) => { if (e.sessionId === state.current) showMessage(e.message); });
  socket.on('session-ended', (e) => {
    if (e.sessionId === state.current) { toast(e.reason === 'idle' ? 'Handed back to the AI after inactivity.' : 'Conversation ended.'); endConversation(); }
  });
}

function wire() {
  $('sign-in-form').addEventListener('submit', (e) => { e.preventDefault(); state.key = $('agent-key').value.trim(); if (state.key) connect(); });
  $('sign-out').addEventListener('click', () => {
    sessionStorage.removeItem(AGENT_KEY_STORE);
    clearTimeout(state.retryTimer);
    state.socket?.close();
    state.key = null;
    setStatus('offline', 'Signed out');
    showSignedIn(false);
    endConversation();
  });
  $('reply-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const message = $('agent-reply').value.trim();
    if (!message || !state.current) return;
    const ack = await call('agent-message', { sessionId: state.current, message });
    if (ack) $('agent-reply').value = '';
  });
  $('agent-reply').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); $('reply-form').requestSubmit(); }
  });
  $('release').addEventListener('click', async () => { if (await call('release', { sessionId: state.current })) endConversation(); });
  $('close').addEventListener('click', async () => {
    const resolution = window.prompt('Resolution', 'Resolved') || 'Resolved';
    if (await call('close', { sessionId: state.current, resolution })) endConversation();
  });
  $('refresh-tickets').addEventListener('click', loadTickets);
}

// For tests and the browser console: `(await import('/static/agent.js')).socket()`.
export const socket = () => state.socket;

async function start() {
  wire();
  state.io = await loadClient();
  if (state.key) connect();
}

start();
