// Helpers both pages share: a toast for errors and the CDN fallback for the Socket.IO client.
'use strict';

window.chatUi = {
  // Shows a short message in #toast for five seconds.
  toast(text) {
    const el = document.getElementById('toast');
    el.textContent = text;
    el.hidden = false;
    clearTimeout(window.chatUi.toastTimer);
    window.chatUi.toastTimer = setTimeout(() => { el.hidden = true; }, 5000);
  },
  // Loads the CDN copy of socket.io-client when the locally served one is missing or failed.
  loadClient() {
    if (window.io) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = document.body.dataset.socketioCdn;
      // Subresource Integrity: the browser runs the CDN copy only if it is byte for byte the pinned release.
      script.integrity = document.body.dataset.socketioIntegrity;
      script.crossOrigin = 'anonymous';
      script.onload = resolve;
      script.onerror = reject;
      document.head.append(script);
    });
  },
};
