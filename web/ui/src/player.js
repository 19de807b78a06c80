// The recordings player, on xterm.js: reads the asciicast v2 stream as it arrives (playback
// starts with the first lines, whatever the recording's size), plays with its timing, seeks
// (replays the output up to that point at once), changes speed, and skips idle time (a pause
// longer than IDLE_CAP plays as IDLE_CAP).
import { Terminal } from '@xterm/xterm';
import { h, fmtDuration } from './dom.js';

const IDLE_CAP = 1.0; // seconds

export function castLine(term, line) {
  const [, kind, data] = line;
  if (kind === 'o') term.write(data);
  else if (kind === 'r') {
    const [c, r] = String(data).split('x').map(Number);
    if (c > 0 && r > 0) term.resize(c, r);
  }
}

export function openPlayer(el, controls, url) {
  const term = new Terminal({
    fontFamily: 'ui-monospace, Menlo, Consolas, monospace', fontSize: 14, disableStdin: true,
    cursorBlink: false, scrollback: 5000, theme: { background: '#000000' },
  });
  term.open(el);
  window.gatehouseTerminal = term;

  const events = []; // [t, kind, data]
  let header = null;
  let loaded = false;
  let skipIdle = true;
  let speed = 1;
  let playing = true;
  let pos = 0; // virtual seconds
  let next = 0; // index of the next event to write
  let last = performance.now();
  let stopped = false;
  let vt = []; // virtual time of each event

  const playBtn = h('button', { id: 'player-play', class: 'secondary' }, 'Pause');
  const seek = h('input', { type: 'range', min: '0', max: '0', step: '0.1', value: '0', class: 'seek', id: 'player-seek', 'aria-label': 'position' });
  const time = h('span', { class: 'muted', id: 'player-time' }, '0s');
  const speedSel = h('select', { id: 'player-speed', 'aria-label': 'speed' }, ...[1, 2, 4, 8].map((s) => h('option', { value: s }, `${s}×`)));
  const idle = h('input', { type: 'checkbox', id: 'player-skip-idle', checked: true });
  const status = h('span', { class: 'muted', id: 'player-status' }, 'Loading…');
  controls.append(playBtn, seek, time, h('label', {}, 'Speed', speedSel), h('label', {}, idle, 'Skip idle'), status);

  const virtual = () => {
    vt = [];
    let prevT = 0;
    let v = 0;
    for (const e of events) {
      const gap = Math.max(0, e[0] - prevT);
      v += skipIdle ? Math.min(gap, IDLE_CAP) : gap;
      vt.push(v);
      prevT = e[0];
    }
  };
  const duration = () => (vt.length ? vt[vt.length - 1] : 0);
  const showTime = () => {
    seek.max = String(duration());
    seek.value = String(Math.min(pos, duration()));
    time.textContent = `${fmtDuration(pos * 1000)} / ${fmtDuration(duration() * 1000)}`;
  };
  const writeUpTo = (p) => {
    let out = '';
    while (next < events.length && vt[next] <= p) {
      const e = events[next];
      if (e[1] === 'o') out += e[2];
      else {
        if (out) { term.write(out); out = ''; }
        castLine(term, e);
      }
      next += 1;
    }
    if (out) term.write(out);
  };
  const seekTo = (p) => {
    term.reset();
    if (header) term.resize(header.width, header.height);
    next = 0;
    pos = Math.max(0, Math.min(p, duration()));
    writeUpTo(pos);
    showTime();
  };

  const tick = () => {
    if (stopped) return;
    const now = performance.now();
    const dt = (now - last) / 1000;
    last = now;
    if (playing) {
      pos += dt * speed;
      if (pos >= duration()) {
        pos = duration();
        if (loaded) {
          playing = false;
          playBtn.textContent = 'Play';
          status.textContent = 'Finished';
        }
      }
      writeUpTo(pos);
      showTime();
    }
    requestAnimationFrame(tick);
  };

  playBtn.onclick = () => {
    if (!playing && pos >= duration()) seekTo(0);
    playing = !playing;
    playBtn.textContent = playing ? 'Pause' : 'Play';
  };
  seek.oninput = () => seekTo(Number(seek.value));
  speedSel.onchange = () => { speed = Number(speedSel.value); };
  idle.onchange = () => {
    // Keep the place: the event written last stays the one written last.
    const at = next;
    skipIdle = idle.checked;
    virtual();
    pos = at > 0 ? vt[at - 1] : 0;
    showTime();
  };

  const read = async () => {
    const resp = await fetch(url, { credentials: 'same-origin' });
    if (!resp.ok) {
      let msg = `${resp.status}`;
      try { msg = (await resp.json()).error; } catch { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const { done, value } = await reader.read();
      if (stopped) { reader.cancel().catch(() => {}); return; }
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      let added = false;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const text = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (!text.trim()) continue;
        const line = JSON.parse(text);
        if (!header) {
          header = line;
          term.resize(header.width, header.height);
          status.textContent = header.title || '';
          continue;
        }
        events.push(line);
        added = true;
      }
      if (added) { virtual(); showTime(); }
    }
    loaded = true;
    virtual();
    showTime();
    status.textContent = `${header ? header.title : ''} — ${events.length} events`;
  };
  read().catch((e) => {
    if (!stopped) status.textContent = `Error: ${e.message}`;
    playing = false;
  });
  requestAnimationFrame(tick);
  return () => { stopped = true; term.dispose(); };
}
