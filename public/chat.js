// The customer chat page: one Socket.IO connection, messages rendered as text, streaming with resume.
import { byId as $, citedText, loadClient, setStatus as setPill, sourcesList, toast } from './ui.js';

const STORE = { sessionId: 'supportChat.sessionId', token: 'supportChat.token', userId: 'supportChat.userId' };
const ERRORS = {
  rate_limited: "You're sending messages too quickly — please wait a moment.",
  unauthorized: 'Your chat session expired; starting a new one.',
  unavailable: 'The service is temporarily unavailable; your message will be retried.',
  payload_too_large: 'That message is too long.',
  internal: 'Something went wrong on our side. Please try again.',
  not_found: 'That conversation no longer exists.',
};
const TRIGGERS = {
  keyword: 'It sounds like this needs a person.',
  low_confidence: "I'm not sure about my answer, so I've asked a person to check.",
  error: "I couldn't answer right now.",
  user_request: 'You asked for a person.',
  sentiment: "I'm sorry this has been frustrating: a person from our team can help.",
};

const state = {
  socket: null,
  sessionId: localStorage.getItem(STORE.sessionId),
  token: localStorage.getItem(STORE.token),
  lastMessageId: null,
  shown: new Set(),          // message ids on screen
  streams: new Map(),        // messageId -> last chunk index seen
  outbox: [],                // messages written while offline
  joined: false,
};

// A stable visitor id for this browser.
function userId() {
  let id = localStorage.getItem(STORE.userId);
  if (!id) {
    id = `visitor-${crypto.randomUUID().slice(0, 8)}`;
    localStorage.setItem(STORE.userId, id);
  }
  return id;
}

// Plain-words error text for an Error object from the server.
function describe(error) {
  if (!error) return 'Something went wrong.';
  if (error.code === 'validation_error' && error.details) {
    return Object.entries(error.details).map(([field, why]) => `${field}: ${typeof why === 'string' ? why : JSON.stringify(why)}`).join(' ');
  }
  return ERRORS[error.code] || error.message || 'Something went wrong.';
}

function setStatus(name, label) {
  setPill('status', name, label);
}

function scrollDown() {
  const list = $('messages');
  list.scrollTop = list.scrollHeight;
}

// Builds one message row; every text goes through textContent, never HTML.
function row(message) {
  const li = document.createElement('li');
  li.className = 'msg';
  li.dataset.role = message.role;
  if (message.id) li.dataset.id = message.id;
  if (message.clientMessageId) li.dataset.clientId = message.clientMessageId;
  const bubble = document.createElement('div');
  bubble.className = 'bubble';
  const text = document.createElement('div');
  text.className = 'msg-text';
  bubble.append(text);
  const meta = document.createElement('div');
  meta.className = 'meta';
  li.append(bubble, meta);
  fillText(li, message);
  fillMeta(li, message);
  return li;
}

// A message's text and, under an answer, the knowledge-base entries it used (its `[n]` markers link to them).
function fillText(li, message) {
  const anchor = `src-${message.id || 'new'}`;
  citedText(li.querySelector('.msg-text'), message.content || '', message.sources, anchor);
  li.querySelector('.sources')?.remove();
  if (message.role === 'assistant' && message.sources?.length) li.querySelector('.bubble').append(sourcesList(message.sources, anchor));
}

// Provider badge, confidence, time, notes and feedback for a row.
function fillMeta(li, message) {
  const meta = li.querySelector('.meta');
  meta.replaceChildren();
  const add = (cls, text) => { const s = document.createElement('span'); s.className = cls; s.textContent = text; meta.append(s); return s; };
  if (message.role === 'agent') add('who', message.agentName ? `${message.agentName} · Support agent` : 'Support agent');
  if (message.role === 'assistant' && message.provider) {
    add('badge-provider', message.provider);
    if (typeof message.confidence === 'number') add('confidence', `${Math.round(message.confidence * 100)}% sure`);
  }
  // Every answer the assistant was unsure of offers a person, whether or not it escalated by itself.
  const low = Number($('messages').dataset.confidenceThreshold || 0.5);
  if (message.role === 'assistant' && typeof message.confidence === 'number' && message.confidence < low) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'talk-to-person';
    b.textContent = 'Talk to a person';
    b.addEventListener('click', () => askForPerson('The answer did not help'));
    meta.append(b);
  }
  if (message.stopped) add('note', 'stopped');
  if (message.incomplete) add('note', 'incomplete');
  if (message.createdAt) add('time', new Date(message.createdAt).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }));
  if (message.role === 'assistant' && message.id) meta.append(feedbackButtons(message.id));
}

function feedbackButtons(messageId) {
  const box = document.createElement('span');
  box.className = 'feedback';
  for (const [rating, label] of [['up', '👍'], ['down', '👎']]) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = label;
    b.setAttribute('aria-label', rating === 'up' ? 'Helpful' : 'Not helpful');
    b.setAttribute('aria-pressed', 'false');
    b.addEventListener('click', () => {
      box.querySelectorAll('button').forEach((x) => x.setAttribute('aria-pressed', 'false'));
      b.setAttribute('aria-pressed', 'true');
      state.socket.emit('feedback', { sessionId: state.sessionId, messageId, rating }, () => {});
    });
    box.append(b);
  }
  return box;
}

// Adds or finalizes a message: one row per id, whatever the order of events.
function show(message) {
  if (message.id && state.shown.has(message.id)) {
    const existing = document.querySelector(`.msg[data-id="${CSS.escape(message.id)}"]`);
    if (existing && message.role !== 'user') {
      fillText(existing, message);
      fillMeta(existing, message);
    }
    state.streams.delete(message.id);
    remember(message);
    return;
  }
  if (message.role === 'user' && message.clientMessageId) {
    const pending = document.querySelector(`.msg[data-client-id="${CSS.escape(message.clientMessageId)}"]`);
    if (pending) { markSent(pending, message.id); remember(message); return; }
  }
  $('messages').append(row(message));
  remember(message);
  scrollDown();
}

function remember(message) {
  if (!message.id) return;
  state.shown.add(message.id);
  state.lastMessageId = message.id;
}

function markSent(li, messageId) {
  li.classList.remove('pending', 'failed');
  li.dataset.id = messageId;
  state.shown.add(messageId);
  li.querySelector('.retry')?.remove();
}

// The bubble of a reply being written.
function streamingRow(messageId, provider) {
  let li = document.querySelector(`.msg[data-id="${CSS.escape(messageId)}"]`);
  if (!li) {
    li = row({ id: messageId, role: 'assistant', content: '', provider });
    $('messages').append(li);
    state.shown.add(messageId);
  }
  return li;
}

function onChunk(chunk) {
  if (chunk.sessionId !== state.sessionId) return;
  const last = state.streams.has(chunk.messageId) ? state.streams.get(chunk.messageId) : -1;
  // Already shown (resume) — unless it starts the reply over: a reply taken over from a server that stopped
  // goes on under the same id, and its first chunk resets what the stopped one had sent.
  if (chunk.index <= last && !chunk.reset) return;
  const li = streamingRow(chunk.messageId, chunk.provider);
  const text = li.querySelector('.msg-text');
  if (chunk.reset) { text.textContent = ''; li.querySelector('.note')?.remove(); }
  text.textContent += chunk.delta;
  state.streams.set(chunk.messageId, chunk.index);
  scrollDown();
}

function onInterrupted(event) {
  const li = streamingRow(event.messageId, event.provider);
  const note = document.createElement('span');
  note.className = 'note';
  note.textContent = `connection to ${event.provider} lost — retrying with another provider`;
  li.querySelector('.meta').append(note);
}

function setTyping(typing) {
  $('typing').hidden = !typing;
  $('stop').hidden = !typing;
}

function showEscalation(escalation) {
  const banner = $('escalation-banner');
  banner.textContent = `We're bringing in a person from our team. ${TRIGGERS[escalation.trigger] || ''}`;
  banner.hidden = false;
}

// Joins (or rejoins) the conversation after every (re)connect.
async function join() {
  state.joined = false;
  // Another tab of this visitor may have rotated the token meanwhile: present the newest one. An old token
  // presented again after the server's grace revokes the whole session.
  if (state.sessionId && localStorage.getItem(STORE.sessionId) === state.sessionId) {
    state.token = localStorage.getItem(STORE.token) || state.token;
  }
  const payload = state.sessionId && state.token
    ? { sessionId: state.sessionId, token: state.token, ...(state.lastMessageId ? { afterMessageId: state.lastMessageId } : {}) }
    : { userId: userId() };
  const ack = await state.socket.timeout(10000).emitWithAck('join-chat', payload).catch(() => null);
  if (!ack) { setStatus('reconnecting', 'Reconnecting…'); return; }
  if (!ack.ok) {
    if (payload.sessionId && ['unauthorized', 'not_found'].includes(ack.error.code)) {
      const newer = localStorage.getItem(STORE.token);
      if (ack.error.code === 'unauthorized' && newer && newer !== payload.token
          && localStorage.getItem(STORE.sessionId) === payload.sessionId) {
        state.token = newer; // another tab rotated it just now: rejoin with the new one, keep the conversation
        return join();
      }
      toast(describe(ack.error));
      forget();
      return join();
    }
    toast(describe(ack.error));
    return;
  }
  state.sessionId = ack.sessionId;
  state.token = ack.token;
  localStorage.setItem(STORE.sessionId, ack.sessionId);
  localStorage.setItem(STORE.token, ack.token);
  state.joined = true;
  setStatus('connected', 'Connected');
  flushOutbox();
}

function onJoined(event) {
  event.history.forEach(show);
  if (event.inProgress) {
    const li = streamingRow(event.inProgress.messageId);
    li.querySelector('.msg-text').textContent = event.inProgress.text;
    state.streams.set(event.inProgress.messageId, event.inProgress.index);
  }
  scrollDown();
}

function forget() {
  localStorage.removeItem(STORE.sessionId);
  localStorage.removeItem(STORE.token);
  state.sessionId = null;
  state.token = null;
  state.lastMessageId = null;
  state.shown.clear();
  state.streams.clear();
  $('messages').replaceChildren();
  $('escalation-banner').hidden = true;
  $('contact-form').hidden = true;
}

// Sends one message with its clientMessageId (a retry reuses it, so nothing is stored twice).
async function send(text, clientMessageId, li) {
  if (!state.joined) { state.outbox.push({ text, clientMessageId, li }); return; }
  const ack = await state.socket.timeout(30000)
    .emitWithAck('send-message', { sessionId: state.sessionId, message: text, clientMessageId })
    .catch(() => null);
  if (!ack) { state.outbox.push({ text, clientMessageId, li }); return; }
  if (ack.ok) { markSent(li, ack.messageId); return; }
  li.classList.add('failed');
  li.classList.remove('pending');
  toast(describe(ack.error));
  if (!li.querySelector('.retry')) {
    const retry = document.createElement('button');
    retry.type = 'button';
    retry.className = 'retry';
    retry.textContent = 'Retry';
    retry.addEventListener('click', () => { li.classList.add('pending'); send(text, clientMessageId, li); });
    li.querySelector('.meta').append(retry);
  }
}

function flushOutbox() {
  const queued = state.outbox.splice(0);
  queued.forEach(({ text, clientMessageId, li }) => send(text, clientMessageId, li));
}

function submit(event) {
  event.preventDefault();
  const box = $('composer');
  const text = box.value.trim();
  if (!text) return;
  const clientMessageId = crypto.randomUUID();
  const li = row({ role: 'user', content: text, clientMessageId });
  li.classList.add('pending');
  $('messages').append(li);
  scrollDown();
  box.value = '';
  updateCounter();
  send(text, clientMessageId, li);
}

// The composer's length against its limit (the server's MAX_MESSAGE_LENGTH, rendered into maxlength).
function updateCounter() {
  const box = $('composer');
  $('counter').textContent = `${box.value.length} / ${box.maxLength}`;
}

// The visitor asks for a person (the header's button, or the one under an unsure answer).
async function askForPerson(reason) {
  const ack = await state.socket.timeout(10000)
    .emitWithAck('escalate', { sessionId: state.sessionId, reason }).catch(() => null);
  if (ack && !ack.ok) toast(describe(ack.error));
}

function wireControls() {
  $('composer-form').addEventListener('submit', submit);
  $('composer').addEventListener('input', updateCounter);
  $('composer').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); $('composer-form').requestSubmit(); }
  });
  $('stop').addEventListener('click', () => state.socket.emit('stop-generation', { sessionId: state.sessionId }, () => {}));
  $('talk-to-human').addEventListener('click', () => askForPerson('Visitor asked for a human'));
  $('new-chat').addEventListener('click', () => { forget(); join(); });
  $('contact-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const email = $('contact-email').value.trim();
    const ack = await state.socket.timeout(10000)
      .emitWithAck('provide-contact', { sessionId: state.sessionId, email }).catch(() => null);
    if (ack && ack.ok) $('contact-form').hidden = true;
    else toast(describe(ack && ack.error));
  });
}

function wireSocket(socket) {
  socket.on('connect', () => { setStatus('connecting', 'Joining…'); join(); });
  socket.on('disconnect', () => { state.joined = false; setStatus('reconnecting', 'Reconnecting…'); setTyping(false); });
  socket.io.on('reconnect_failed', () => setStatus('offline', 'Offline'));
  socket.on('connect_error', () => setStatus(socket.active ? 'reconnecting' : 'offline', socket.active ? 'Reconnecting…' : 'Offline'));
  socket.on('chat-joined', onJoined);
  socket.on('message-chunk', onChunk);
  socket.on('message-interrupted', onInterrupted);
  socket.on('assistant-typing', (e) => setTyping(e.typing));
  socket.on('message-received', (e) => {
    if (e.sessionId !== state.sessionId) return;
    show(e.message);
    if (e.message.role !== 'user') setTyping(false);
    if (e.escalation) showEscalation(e.escalation);
  });
  socket.on('escalation-needed', showEscalation);
  // agent-joined, agent-left and ticket-created also arrive as stored system messages, shown once.
  socket.on('agent-joined', () => { $('escalation-banner').textContent = 'A person from our team is with you now.'; });
  socket.on('agent-left', () => { $('escalation-banner').hidden = true; });
  socket.on('contact-requested', () => { $('contact-form').hidden = false; });
  socket.on('ticket-created', () => { $('contact-form').hidden = true; });
  socket.on('chat-error', (e) => toast(describe(e.error)));
}

async function start() {
  wireControls();
  let io;
  try {
    io = await loadClient();
  } catch {
    setStatus('offline', 'Offline');
    toast('Could not load the chat client. Check your connection and reload.');
    return;
  }
  state.socket = io({ transports: ['websocket', 'polling'], reconnection: true });
  wireSocket(state.socket);
}

// For tests and the browser console: `(await import('/static/chat.js')).socket()`.
export const socket = () => state.socket;
export const sessionId = () => state.sessionId;

start();
