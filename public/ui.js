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
