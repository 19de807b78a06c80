// The web terminal (xterm.js over a WebSocket to an SSH session the proxy opens as the user) and
// the read-only view of a live session. Binary frames carry the terminal's bytes; text frames
// are JSON control messages. A paste goes in pieces (the server takes at most 1 MiB a frame).
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { castLine } from './player.js';

const PIECE = 32 * 1024;

function newTerminal(el, opts = {}) {
  const term = new Terminal({
    cursorBlink: true,
    fontFamily: 'ui-monospace, Menlo, Consolas, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: '#000000' },
    ...opts,
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(el);
  try { fit.fit(); } catch { /* not laid out yet */ }
  return { term, fit };
}

function wsUrl(path, params) {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${location.host}${path}?${new URLSearchParams(params)}`;
}

export function openTerminal(el, { node, login, csrf }, status) {
  const { term, fit } = newTerminal(el);
  const ws = new WebSocket(wsUrl('/v1/webapi/ws/ssh', {
    node, login, cols: term.cols, rows: term.rows, csrf,
  }));
  ws.binaryType = 'arraybuffer';
  const enc = new TextEncoder();
  let ended = false;
  ws.onopen = () => status(`Connected to ${login}@${node}`);
  ws.onmessage = (ev) => {
    if (typeof ev.data === 'string') {
      const m = JSON.parse(ev.data);
      ended = true;
      if (m.type === 'exit') status(`Session ended${m.code === null ? '' : ` (exit code ${m.code})`}`);
      else if (m.type === 'error') status(`Error: ${m.message}`);
      return;
    }
    term.write(new Uint8Array(ev.data));
  };
  ws.onclose = () => { if (!ended) status('Disconnected'); };
  const send = (text) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    const bytes = enc.encode(text);
    for (let i = 0; i < bytes.length; i += PIECE) ws.send(bytes.subarray(i, i + PIECE));
  };
  term.onData(send);
  term.onResize(({ cols, rows }) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'resize', cols, rows }));
  });
  const onWindowResize = () => { try { fit.fit(); } catch { /* hidden or disposed */ } };
  window.addEventListener('resize', onWindowResize);
  term.focus();
  window.gatehouseTerminal = term; // for tests and debugging: read the screen
  return () => {
    window.removeEventListener('resize', onWindowResize);
    ws.onmessage = null;
    ws.onclose = null;
    ws.close();
    term.dispose();
  };
}

export function openJoin(el, { id, csrf }, status) {
  const { term } = newTerminal(el, { disableStdin: true, cursorBlink: false });
  const ws = new WebSocket(wsUrl('/v1/webapi/ws/join', { id, csrf }));
  let first = true;
  ws.onopen = () => status('Watching (read-only)');
  ws.onmessage = (ev) => {
    const line = JSON.parse(ev.data);
    if (first && line.version === 2) {
      first = false;
      term.resize(line.width, line.height);
      status(`Watching ${line.title} (read-only)`);
      return;
    }
    if (!Array.isArray(line)) {
      if (line.type === 'end') status(`Session ended (${line.state})`);
      else if (line.type === 'error') status(`Error: ${line.message}`);
      return;
    }
    castLine(term, line);
  };
  ws.onclose = () => {};
  window.gatehouseTerminal = term;
  return () => {
    ws.onmessage = null;
    ws.close();
    term.dispose();
  };
}
