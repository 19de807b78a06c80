// Gatehouse web UI: one page, routes in the URL's hash. Everything it shows comes from the
// JSON API under /v1/webapi/ (as the logged-in user: Auth decides what they may see). Text from
// the server is only ever set as textContent, never parsed as HTML.
import '@xterm/xterm/css/xterm.css';
import './style.css';
import { api, setCsrf, csrf } from './api.js';
import { openTerminal, openJoin } from './terminal.js';
import { openPlayer } from './player.js';
import { h, clear, fmtTime, fmtDuration } from './dom.js';

const app = document.getElementById('app');
let me = null; // the session: { user, cluster, roles, logins, expires, csrf }
let cleanup = null; // closes the current page's terminal or player

async function loadSession() {
  try {
    me = await api('GET', '/v1/webapi/session');
    setCsrf(me.csrf);
  } catch {
    me = null;
  }
}

function nav() {
  const route = location.hash.split('/')[1] || 'nodes';
  const link = (name, label) =>
    h('a', { href: `#/${name}`, class: route === name ? 'active' : '' }, label);
  return h(
    'header',
    {},
    h('div', { class: 'brand' }, 'Gatehouse', h('span', {}, me.cluster)),
    h(
      'nav',
      {},
      link('nodes', 'Nodes'),
      link('sessions', 'Active sessions'),
      link('recordings', 'Recordings'),
      link('audit', 'Audit log'),
      link('account', 'Account'),
    ),
    h('span', { class: 'who', id: 'who' }, me.user),
    h('button', { class: 'secondary', id: 'logout', onclick: logout }, 'Log out'),
  );
}

async function logout() {
  try {
    await api('POST', '/v1/webapi/logout', {});
  } finally {
    me = null;
    location.hash = '#/login';
  }
}

function page(title, ...content) {
  clear(app);
  app.append(nav(), h('main', {}, h('h1', {}, title), ...content));
}

function errorBox(e) {
  return h('div', { class: 'error', role: 'alert' }, e.message || String(e));
}

// ---- login ----

function loginPage(message) {
  clear(app);
  const err = h('div', { class: 'error', role: 'alert', id: 'login-error' }, message || '');
  const user = h('input', { name: 'user', id: 'user', autocomplete: 'username', required: true });
  const password = h('input', {
    name: 'password', id: 'password', type: 'password', autocomplete: 'current-password', required: true,
  });
  const otp = h('input', {
    name: 'otp', id: 'otp', inputmode: 'numeric', autocomplete: 'one-time-code', placeholder: '123456',
  });
  const submit = h('button', { type: 'submit', id: 'login-submit' }, 'Log in');
  const form = h(
    'form',
    {
      onsubmit: async (ev) => {
        ev.preventDefault();
        submit.disabled = true;
        err.textContent = '';
        try {
          me = await api('POST', '/v1/webapi/login', {
            user: user.value, password: password.value, otp: otp.value.trim(),
          });
          setCsrf(me.csrf);
          location.hash = '#/nodes';
          route();
        } catch (e) {
          err.textContent = e.otpRequired ? 'Enter the one-time code from your authenticator app.' : e.message;
          if (e.otpRequired) otp.focus();
        } finally {
          submit.disabled = false;
        }
      },
    },
    h('label', {}, 'User', user),
    h('label', {}, 'Password', password),
    h('label', {}, 'One-time code (if your cluster asks for one)', otp),
    submit,
    err,
  );
  app.append(h('div', { class: 'login panel' }, h('h1', {}, 'Log in to Gatehouse'), form));
  user.focus();
}

// ---- nodes ----

async function nodesPage() {
  const search = h('input', { id: 'node-search', placeholder: 'Search by name or label (env=prod)', size: 40 });
  const body = h('tbody');
  const table = h('table', { id: 'nodes' },
    h('thead', {}, h('tr', {}, h('th', {}, 'Node'), h('th', {}, 'Labels'), h('th', {}, 'Services'), h('th', {}, 'Connect'))),
    body);
  const status = h('div', { class: 'status' });
  page('Nodes', h('div', { class: 'toolbar' }, search), h('div', { class: 'panel' }, table, status));
  let timer = null;
  const load = async () => {
    try {
      const r = await api('GET', `/v1/webapi/nodes?q=${encodeURIComponent(search.value)}`);
      clear(body);
      for (const n of r.nodes) {
        const login = h('select', { 'aria-label': `login on ${n.name}` }, ...r.logins.map((l) => h('option', { value: l }, l)));
        const connect = h('button', {
          class: 'connect',
          disabled: r.logins.length === 0,
          onclick: () => { location.hash = `#/term/${encodeURIComponent(n.name)}/${encodeURIComponent(login.value)}`; },
        }, 'Connect');
        body.append(h('tr', { 'data-node': n.name },
          h('td', {}, n.name, h('div', { class: 'muted' }, n.host_id)),
          h('td', {}, ...n.labels.map((l) => h('span', { class: 'chip' }, l))),
          h('td', {}, n.services.join(', ')),
          h('td', {}, login, ' ', connect)));
      }
      status.textContent = r.nodes.length === 0 ? 'No node you may reach matches.' : `${r.nodes.length} node(s)`;
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  };
  search.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(load, 200); });
  await load();
}

// ---- terminal ----

function terminalPage(node, login) {
  const status = h('div', { class: 'status', id: 'term-status' }, `Connecting to ${login}@${node}…`);
  const wrap = h('div', { class: 'term-wrap', id: 'terminal' });
  page(`${login}@${node}`, status, wrap);
  cleanup = openTerminal(wrap, { node, login, csrf: csrf() }, (s) => { status.textContent = s; });
}

// ---- active sessions and join ----

function recordingRow(r, action) {
  return h('tr', { 'data-id': r.id },
    h('td', {}, fmtTime(r.started_unix_ms)),
    h('td', {}, r.user),
    h('td', {}, `${r.login}@${r.node}`),
    h('td', {}, r.command || r.kind),
    h('td', {}, fmtDuration(r.duration_ms)),
    h('td', {}, r.state),
    h('td', {}, action));
}

function recordingsTable(id, rows) {
  return h('table', { id },
    h('thead', {}, h('tr', {}, ...['Started', 'User', 'Login@node', 'Session', 'Duration', 'State', ''].map((t) => h('th', {}, t)))),
    h('tbody', {}, ...rows));
}

async function sessionsPage() {
  page('Active sessions', h('div', { class: 'status' }, 'Loading…'));
  try {
    const r = await api('GET', '/v1/webapi/sessions');
    const rows = r.recordings.map((s) => recordingRow(s, h('a', { href: `#/join/${s.id}`, class: 'join' }, 'Join')));
    page('Active sessions', h('div', { class: 'panel' },
      rows.length ? recordingsTable('sessions', rows) : h('div', { class: 'muted' }, 'No active session you may watch.')));
  } catch (e) {
    page('Active sessions', errorBox(e));
  }
}

function joinPage(id) {
  const status = h('div', { class: 'status', id: 'join-status' }, 'Joining (read-only)…');
  const wrap = h('div', { class: 'term-wrap', id: 'join-terminal' });
  page('Watching a session (read-only)', status, wrap);
  cleanup = openJoin(wrap, { id, csrf: csrf() }, (s) => { status.textContent = s; });
}

// ---- recordings and playback ----

async function recordingsPage() {
  page('Recordings', h('div', { class: 'status' }, 'Loading…'));
  try {
    const r = await api('GET', '/v1/webapi/recordings?limit=200');
    const rows = r.recordings.map((s) => recordingRow(s, h('a', { href: `#/play/${s.id}`, class: 'play' }, 'Play')));
    page('Recordings', h('div', { class: 'panel' },
      rows.length ? recordingsTable('recordings', rows) : h('div', { class: 'muted' }, 'No recording you may see.')));
  } catch (e) {
    page('Recordings', errorBox(e));
  }
}

function playPage(id) {
  const controls = h('div', { class: 'toolbar', id: 'player-controls' });
  const wrap = h('div', { class: 'term-wrap', id: 'player' });
  page('Recording', controls, wrap);
  cleanup = openPlayer(wrap, controls, `/v1/webapi/recordings/${encodeURIComponent(id)}/cast`);
}

// ---- audit ----

async function auditPage() {
  const from = h('input', { type: 'datetime-local', id: 'audit-from' });
  const to = h('input', { type: 'datetime-local', id: 'audit-to' });
  const type = h('input', { id: 'audit-type', placeholder: 'session.start, user.login', size: 24 });
  const user = h('input', { id: 'audit-user', placeholder: 'user', size: 12 });
  const body = h('tbody');
  const status = h('div', { class: 'status' });
  const load = async () => {
    const q = new URLSearchParams();
    if (from.value) q.set('from', String(new Date(from.value).getTime()));
    if (to.value) q.set('to', String(new Date(to.value).getTime()));
    if (type.value.trim()) q.set('type', type.value.trim());
    if (user.value.trim()) q.set('user', user.value.trim());
    q.set('limit', '500');
    try {
      const r = await api('GET', `/v1/webapi/events?${q}`);
      clear(body);
      for (const e of r.events) {
        body.append(h('tr', { 'data-type': e.type },
          h('td', {}, fmtTime(e.time_ms)),
          h('td', {}, e.type),
          h('td', {}, e.actor),
          h('td', {}, e.source_addr),
          h('td', {}, h('pre', { class: 'data' }, JSON.stringify(e.data)))));
      }
      status.textContent = `${r.events.length} event(s), newest first`;
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  };
  const apply = h('button', { id: 'audit-apply', onclick: load }, 'Apply');
  page('Audit log',
    h('div', { class: 'toolbar' },
      h('label', {}, 'From', from), h('label', {}, 'To', to),
      h('label', {}, 'Type', type), h('label', {}, 'User', user), apply),
    h('div', { class: 'panel' },
      h('table', { id: 'events' },
        h('thead', {}, h('tr', {}, ...['Time', 'Type', 'User', 'Address', 'Details'].map((t) => h('th', {}, t)))),
        body),
      status));
  await load();
}

// ---- account ----

function accountPage() {
  page('Account', h('div', { class: 'panel' }, h('dl', { id: 'account' },
    h('dt', {}, 'User'), h('dd', {}, me.user),
    h('dt', {}, 'Cluster'), h('dd', {}, me.cluster),
    h('dt', {}, 'Roles'), h('dd', { id: 'account-roles' }, ...me.roles.map((r) => h('span', { class: 'chip' }, r))),
    h('dt', {}, 'Logins'), h('dd', { id: 'account-logins' }, me.logins.join(', ') || '(none)'),
    h('dt', {}, 'Session ends'), h('dd', {}, fmtTime(me.expires * 1000)))));
}

// ---- routing ----

async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  if (!me) await loadSession();
  if (!me) {
    loginPage(parts[0] === 'login' || parts[0] === '' ? '' : 'Your session has ended: log in again.');
    return;
  }
  switch (parts[0]) {
    case 'term': return terminalPage(parts[1], parts[2]);
    case 'sessions': return sessionsPage();
    case 'join': return joinPage(parts[1]);
    case 'recordings': return recordingsPage();
    case 'play': return playPage(parts[1]);
    case 'audit': return auditPage();
    case 'account': return accountPage();
    default: return nodesPage();
  }
}

window.addEventListener('hashchange', route);
window.addEventListener('gatehouse:unauthorized', () => { me = null; route(); });
route();
