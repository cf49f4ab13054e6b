// The agent console: sign in with an agent key, see the queue, claim, talk, hand back or close.
'use strict';

const $ = (id) => document.getElementById(id);
const KEY_STORE = 'supportChat.agentKey';
const state = { socket: null, key: sessionStorage.getItem(KEY_STORE), current: null, shown: new Set() };

const { toast, loadClient } = window.chatUi;

function setStatus(name, label) {
  $('agent-status').dataset.state = name;
  $('agent-status').textContent = label;
}

function text(tag, cls, content) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  el.textContent = content;
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
  bubble.append(text('div', 'msg-text', message.content || ''));
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
    li.append(text('span', 'trigger', `${entry.trigger} · ${entry.userId || 'visitor'}`));
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
  info.textContent = `Escalated by ${ack.trigger}: ${ack.reason || ''} — ${ack.summary || ''}`;
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
  const response = await fetch('/api/v1/tickets', { headers: { Authorization: `Bearer ${state.key}` } });
  if (!response.ok) return;
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

function connect() {
  if (state.socket) state.socket.close();
  setStatus('connecting', 'Connecting…');
  const socket = window.io('/agents', { auth: { key: state.key }, transports: ['websocket', 'polling'] });
  state.socket = socket;
  socket.on('connect', async () => {
    setStatus('connected', 'Signed in');
    $('sign-in').hidden = true;
    $('sign-out').hidden = false;
    sessionStorage.setItem(KEY_STORE, state.key);
    const ack = await call('get-queue', {});
    if (ack) renderQueue(ack.queue);
    loadTickets();
  });
  socket.on('connect_error', (err) => {
    setStatus('offline', 'Sign-in refused');
    toast(err && err.data && err.data.message ? err.data.message : 'Could not connect with that key.');
    sessionStorage.removeItem(KEY_STORE);
    socket.close();
  });
  socket.on('disconnect', () => setStatus('connecting', 'Reconnecting…'));
  socket.on('queue-updated', (e) => renderQueue(e.queue));
  socket.on('message-received', (e) => { if (e.sessionId === state.current) showMessage(e.message); });
  socket.on('session-ended', (e) => {
    if (e.sessionId === state.current) { toast(e.reason === 'idle' ? 'Handed back to the AI after inactivity.' : 'Conversation ended.'); endConversation(); }
  });
}

function wire() {
  $('sign-in-form').addEventListener('submit', (e) => { e.preventDefault(); state.key = $('agent-key').value.trim(); if (state.key) connect(); });
  $('sign-out').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORE);
    state.socket?.close();
    setStatus('offline', 'Signed out');
    $('sign-in').hidden = false;
    $('sign-out').hidden = true;
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


(async () => {
  wire();
  await loadClient();
  if (state.key) connect();
})();
