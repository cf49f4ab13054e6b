// The analytics dashboard: the last 30 days from /api/v1/analytics, drawn as small SVG bar charts.
import { AGENT_KEY_STORE, byId as $, setStatus, toast } from './ui.js';

const SVG = 'http://www.w3.org/2000/svg';

// One bar chart of a per-day value (null days are gaps).
function barChart(title, days, value, format = (v) => String(v)) {
  const box = document.createElement('section');
  box.className = 'chart';
  box.dataset.metric = title;
  const heading = document.createElement('h2');
  heading.textContent = title;
  const values = days.map(value);
  const max = Math.max(1e-9, ...values.filter((v) => typeof v === 'number'));
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${days.length * 10} 100`);
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', title);
  values.forEach((v, i) => {
    if (typeof v !== 'number' || v <= 0) return; // no data, or nothing to draw
    const rect = document.createElementNS(SVG, 'rect');
    const h = Math.max(2, (v / max) * 95);
    rect.setAttribute('x', String(i * 10 + 1));
    rect.setAttribute('y', String(100 - h));
    rect.setAttribute('width', '8');
    rect.setAttribute('height', String(h));
    const tip = document.createElementNS(SVG, 'title');
    tip.textContent = `${days[i].date}: ${format(v)}`;
    rect.append(tip);
    svg.append(rect);
  });
  box.append(heading, svg);
  return box;
}

function total(label, text) {
  const div = document.createElement('div');
  div.className = 'total';
  const strong = document.createElement('strong');
  strong.textContent = text;
  div.append(strong, document.createTextNode(label));
  return div;
}

function render(days) {
  const sum = (f) => days.reduce((acc, d) => acc + (f(d) || 0), 0);
  const conversations = sum((d) => d.conversations);
  const replies = sum((d) => d.replies);
  const escalations = sum((d) => Object.values(d.escalations).reduce((a, b) => a + b, 0));
  const byTrigger = {};  // keyword, low_confidence, sentiment, error, user_request: what brought people in
  for (const d of days) for (const [trigger, n] of Object.entries(d.escalations)) byTrigger[trigger] = (byTrigger[trigger] || 0) + n;
  const triggers = Object.entries(byTrigger).sort((a, b) => b[1] - a[1]).map(([t, n]) => `${t} ${n}`).join(' · ') || '—';
  const up = sum((d) => d.feedback.up);
  const down = sum((d) => d.feedback.down);
  $('totals').replaceChildren(
    total('conversations (30 days)', String(conversations)),
    total('replies', String(replies)),
    total('escalations', String(escalations)),
    total('escalations by trigger', triggers),
    total('feedback 👍 / 👎', `${up} / ${down}`),
  );
  const pct = (v) => `${Math.round(v * 100)}%`;
  $('charts').replaceChildren(
    barChart('Conversations', days, (d) => d.conversations),
    barChart('Containment rate', days, (d) => d.containmentRate, pct),
    barChart('Escalations', days, (d) => Object.values(d.escalations).reduce((a, b) => a + b, 0)),
    barChart('Share answered by OpenAI', days, (d) => d.providerShare.openai ?? (d.replies ? 0 : null), pct),
    barChart('Mean confidence', days, (d) => d.meanConfidence, pct),
    barChart('Reply latency p95 (ms)', days, (d) => d.replyLatencyMs.p95),
    barChart('Tokens used', days, (d) => d.tokensUsed),
    barChart('Feedback score', days, (d) => (d.feedback.score === null ? null : (d.feedback.score + 1) / 2), pct),
  );
}

async function load(key) {
  const response = await fetch('/api/v1/analytics', { headers: { Authorization: `Bearer ${key}` } });
  if (!response.ok) {
    setStatus('dash-status', 'offline', 'Key refused');
    toast('That agent key was not accepted.');
    return;
  }
  sessionStorage.setItem(AGENT_KEY_STORE, key);
  setStatus('dash-status', 'connected', 'Signed in');
  render((await response.json()).days);
}

$('dash-sign-in').addEventListener('submit', (e) => { e.preventDefault(); load($('agent-key').value.trim()); });
const saved = sessionStorage.getItem(AGENT_KEY_STORE);
if (saved) load(saved);
