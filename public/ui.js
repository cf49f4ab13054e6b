// What the pages share: an element lookup, the error toast, the status pill, and the Socket.IO client loader.

// Where the agent console and the dashboard keep the agent key: this tab's sessionStorage, under this name.
export const AGENT_KEY_STORE = 'supportChat.agentKey';

// The element with this id.
export const byId = (id) => document.getElementById(id);

let toastTimer = null;

// Shows a short message in #toast for five seconds.
export function toast(text) {
  const el = byId('toast');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 5000);
}

// Sets a status pill: its state (styled by data-state) and its words.
export function setStatus(id, name, label) {
  const el = byId(id);
  el.dataset.state = name;
  el.textContent = label;
}

// The socket.io-client `io` function. The library is a classic script that defines `window.io`, the one global the
// pages read, and only here. When the locally served copy is missing or failed, the pinned CDN copy is loaded.
export function loadClient() {
  if (window.io) return Promise.resolve(window.io);
  return new Promise((resolve, reject) => {
    const script = document.createElement('script');
    script.src = document.body.dataset.socketioCdn;
    // Subresource Integrity: the browser runs the CDN copy only if it is byte for byte the pinned release.
    script.integrity = document.body.dataset.socketioIntegrity;
    script.crossOrigin = 'anonymous';
    script.onload = () => (window.io ? resolve(window.io) : reject(new Error('socket.io client did not load')));
    script.onerror = reject;
    document.head.append(script);
  });
}

// A citation in an assistant message's text: `[n]` refers to the message's `sources[n - 1]` (the server numbers them).
const CITATION = /\[(\d{1,2})\]/g;

// Fills `el` with a message's text, each citation of a listed source as a superscript link to it; text, never HTML.
// `anchor` prefixes the ids of the source list's items (one per message). Markers with no source stay as text.
export function citedText(el, content, sources, anchor) {
  const text = String(content ?? '');
  const list = Array.isArray(sources) ? sources : [];
  el.replaceChildren();
  let at = 0;
  for (const match of text.matchAll(CITATION)) {
    const source = list[Number(match[1]) - 1];
    if (!source) continue;
    el.append(document.createTextNode(text.slice(at, match.index).replace(/[ \t]+$/, ''))); // a footnote hugs its word
    const sup = document.createElement('sup');
    sup.className = 'cite';
    const link = document.createElement('a');
    link.href = `#${anchor}-${match[1]}`;
    link.textContent = match[1];
    link.title = String(source.title ?? '');
    link.setAttribute('aria-label', `Source ${match[1]}: ${link.title}`);
    sup.append(link);
    el.append(sup);
    at = match.index + match[0].length;
  }
  el.append(document.createTextNode(text.slice(at)));
}

// The knowledge-base entries an answer used, numbered as its citations, shown under it (titles as text).
export function sourcesList(sources, anchor) {
  const box = document.createElement('div');
  box.className = 'sources';
  const label = document.createElement('span');
  label.className = 'sources-label';
  label.textContent = sources.length > 1 ? 'Sources' : 'Source';
  const list = document.createElement('ol');
  sources.forEach((source, i) => {
    const item = document.createElement('li');
    item.id = `${anchor}-${i + 1}`;
    item.textContent = String(source.title ?? '');
    list.append(item);
  });
  box.append(label, list);
  return box;
}
