// The funnelwatch page: renders /api/v1/segments and /api/v1/trends as a
// table of segments, degraded ones first, and refreshes every 5 seconds.
// No dependencies and no network beyond the processor itself, so it works
// offline and behind a strict Content-Security-Policy. Every value that
// comes from events (segment labels) goes into the DOM as text, never HTML.
'use strict';

(() => {
  const REFRESH_MS = 5000;
  const TREND_HOURS = 24;
  const SVGNS = 'http://www.w3.org/2000/svg';
  const nf = new Intl.NumberFormat('en-US');
  const $ = (id) => document.getElementById(id);

  // View state, mirrored in the URL fragment so that a view can be shared.
  const view = { breakdown: '*', window: '', onlyDegraded: false };
  let snap = null;
  let trend = null;
  let updated = null;

  // h builds an element: attrs are attributes (class, text and data-* too),
  // kids are nodes or strings (appended as text).
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    for (const k of kids.flat()) {
      if (k !== null && k !== undefined && k !== false) el.append(k instanceof Node ? k : String(k));
    }
    return el;
  }

  function svg(tag, attrs) {
    const el = document.createElementNS(SVGNS, tag);
    setAttrs(el, attrs);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'text') el.textContent = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }

  const num = (n) => nf.format(Math.round(n));
  const pct = (r) => (r === null || r === undefined ? '–' : (r * 100).toFixed(1) + '%');
  const zText = (z) => (z < 0 ? '−' : '') + Math.abs(z).toFixed(1);
  const plural = (n, word) => `${nf.format(n)} ${word}${n === 1 ? '' : 's'}`;
  const breakdownLabel = (b) => (b === 'all' ? 'all (overall)' : b.replaceAll('+', ' + '));

  function clockText(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '–';
    return d.toISOString().slice(0, 19).replace('T', ' ') + ' UTC';
  }

  // Fragment <-> view.
  function readHash() {
    const q = new URLSearchParams(location.hash.slice(1));
    view.breakdown = q.get('breakdown') || '*';
    view.window = q.get('window') || '';
    view.onlyDegraded = q.get('degraded') === '1';
  }

  function writeHash() {
    const q = new URLSearchParams();
    if (view.breakdown !== '*') q.set('breakdown', view.breakdown);
    if (view.window) q.set('window', view.window);
    if (view.onlyDegraded) q.set('degraded', '1');
    const s = q.toString();
    history.replaceState(null, '', s ? '#' + s : location.pathname + location.search);
  }

  // verdict summarises a segment: degraded (and which signals), ok, or
  // learning while there is no baseline to compare with.
  function verdict(seg) {
    const bad = seg.alerts.filter((a) => a.degraded).map((a) => `${a.from} → ${a.to}`);
    if (seg.volume && seg.volume.degraded) bad.push(`${seg.volume.step} volume`);
    if (bad.length > 0) return { kind: 'degraded', label: 'degraded', detail: bad.join(', ') };
    const baseline = seg.alerts.some((a) => a.baseline_entered != null) || (seg.volume && seg.volume.baseline != null);
    if (!baseline) return { kind: 'learning', label: 'no baseline', detail: 'less than a week of history' };
    return { kind: 'ok', label: 'ok', detail: '' };
  }

  // segmentCell names the segment and says whether it is degraded, in
  // words as well as in colour.
  function segmentCell(seg, v) {
    const all = seg.labels.length === 0;
    return h('th', { scope: 'row', class: 'seg' },
      h('span', { class: 'seg-name', text: all ? 'All traffic' : seg.labels.map((l) => l.value).join(' · ') }),
      h('span', { class: 'seg-dims', text: all ? 'overall' : seg.labels.map((l) => l.name).join(' · ') }),
      h('span', { class: 'status' },
        h('span', { class: `badge ${v.kind}`, 'data-status': v.kind, text: v.label }),
        v.detail ? h('span', { class: 'detail', text: v.detail }) : null));
  }

  // funnelCell lists the entities per stage in the window with the flow
  // ratio between consecutive stages.
  function funnelCell(seg, w) {
    const wv = seg.windows.find((x) => x.window === w) || seg.windows[0];
    const ol = h('ol', { class: 'funnel', 'aria-label': `entities per stage, last ${wv.window}` });
    snap.stages.forEach((st, i) => {
      if (i > 0) {
        const prev = snap.stages[i - 1];
        const f = seg.flows.find((x) => x.window === wv.window && x.from === prev && x.to === st);
        ol.append(h('li', { class: 'flow', title: `flow ratio ${prev} → ${st}, last ${wv.window}` },
          h('span', { class: 'arrow', 'aria-hidden': 'true', text: '→' }), pct(f ? f.ratio : null),
          h('span', { class: 'sr', text: ` of ${prev} reached ${st}` })));
      }
      ol.append(h('li', { class: 'stage', 'data-stage': st, title: `${num(wv.events[i])} ${st} events, last ${wv.window}` },
        h('span', { class: 'n', text: num(wv.entities[i]) }), h('span', { class: 'name', text: st })));
    });
    return h('td', { class: 'funnel-cell' }, ol);
  }

  function alertLine(a) {
    let t = `${a.from} → ${a.to} (cohort, ${a.window}): ${pct(a.ratio)}`;
    let tip = `${num(a.converted)} of ${num(a.entered)} entered converted`;
    if (a.baseline_ratio != null) t += ` vs ${pct(a.baseline_ratio)} baseline`;
    else if (a.baseline_entered == null) t += ' (no baseline yet)';
    if (a.z != null) t += `, z = ${zText(a.z)}`;
    if (a.baseline_entered != null) {
      tip += `; baseline ${num(a.baseline_converted)} of ${num(a.baseline_entered)} over ${plural(a.baseline_weeks, 'previous week')}`;
    }
    return h('li', { class: a.degraded && 'bad', 'data-step': `${a.from}-${a.to}`, 'data-degraded': String(a.degraded), title: tip },
      a.degraded ? h('span', { class: 'mark', text: '▼ ' }) : null, t);
  }

  function cohortLine(c) {
    const t = `${c.from} → ${c.to} (cohort, ${c.window}): ${pct(c.ratio)}`;
    return h('li', { 'data-step': `${c.from}-${c.to}`, title: `${num(c.converted)} of ${num(c.entered)} entered converted` }, t);
  }

  function volumeLine(v) {
    let t = `${v.step} volume (${v.window}): ${num(v.entities)}`;
    if (v.baseline != null) t += ` vs ${num(v.baseline)} baseline`;
    if (v.z != null) t += `, z = ${zText(v.z)}`;
    return h('li', { class: v.degraded ? 'bad' : 'muted', 'data-step': `${v.step}-volume`, 'data-degraded': String(v.degraded) },
      v.degraded ? h('span', { class: 'mark', text: '▼ ' }) : null, t);
  }

  // conversionCell shows every step: alerting steps at their alert window
  // against the baseline, the others as cohort rates in the chosen window.
  // Steps without any mature cohort yet share one line.
  function conversionCell(seg, w) {
    const ul = h('ul', { class: 'conv' });
    const waiting = new Map(); // horizon → steps
    for (const st of snap.steps) {
      const a = seg.alerts.find((x) => x.from === st.from && x.to === st.to);
      const c = a || seg.cohorts.find((x) => x.from === st.from && x.to === st.to && x.window === w);
      if (!c) continue;
      if (c.ratio == null) {
        waiting.set(st.horizon, [...(waiting.get(st.horizon) || []), `${st.from} → ${st.to}`]);
        continue;
      }
      ul.append(a ? alertLine(a) : cohortLine(c));
    }
    for (const [horizon, steps] of waiting) {
      ul.append(h('li', { class: 'muted', title: 'a cohort is mature once its horizon and the grace period have passed' },
        `${steps.join(', ')}: no mature cohort yet (${horizon} horizon)`));
    }
    if (seg.volume && seg.volume.step) ul.append(volumeLine(seg.volume));
    return h('td', { class: 'conv-cell' }, ul);
  }

  // sparkline draws hourly values (null: no data) from 0 to their maximum.
  function sparkline(values, label, fmt, cls) {
    const W = 108;
    const H = 28;
    const P = 3;
    const known = values.filter((v) => v !== null);
    const max = Math.max(0, ...known) || 1;
    const x = (i) => (P + (i * (W - 2 * P)) / Math.max(values.length - 1, 1)).toFixed(1);
    const y = (v) => (H - P - (v / max) * (H - 2 * P)).toFixed(1);
    let d = '';
    let pen = false;
    values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      d += `${pen ? 'L' : 'M'}${x(i)} ${y(v)}`;
      pen = true;
    });
    const summary = known.length ? `${label}, last ${values.length} hours: min ${fmt(Math.min(...known))}, max ${fmt(max)}` : `${label}: no data`;
    const el = svg('svg', { class: `spark ${cls}`, viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': summary });
    el.append(svg('title', { text: summary }));
    el.append(svg('line', { class: 'axis', x1: P, x2: W - P, y1: H - P, y2: H - P }));
    if (d) el.append(svg('path', { class: 'line', d }));
    const last = values.length - 1;
    if (last >= 0 && values[last] !== null) el.append(svg('circle', { class: 'dot', cx: x(last), cy: y(values[last]), r: 2.2 }));
    return el;
  }

  // trendCell draws, per full hour of the last day, the entities reaching
  // the first stage and the flow ratio of the first step. The running hour
  // is left out: its partial count would read as a drop.
  function trendCell(seg, degraded) {
    const td = h('td', { class: 'trend-cell' });
    if (!trend || snap.stages.length === 0) return td;
    const series = trend.segments[seg.id];
    const hours = trend.hours - 1;
    const ent = (i) => (series && series.entities[i] ? series.entities[i].slice(0, hours) : new Array(hours).fill(0));
    const lastOf = (vals) => (vals.length ? vals[vals.length - 1] : null);
    const chart = (label, value, spark) => h('figure', { class: 'trend' },
      h('figcaption', {}, `${label} `, h('b', { text: value })), spark);
    const stage = snap.stages[0];
    const first = ent(0);
    const wrap = h('div', { class: 'trends' }, chart(`${stage}/h`, num(lastOf(first) || 0), sparkline(first, `${stage} entities per hour`, num, 'volume')));
    const step = snap.steps[0];
    if (step) {
      const a = ent(snap.stages.indexOf(step.from));
      const b = ent(snap.stages.indexOf(step.to));
      const r = a.map((n, i) => (n > 0 ? b[i] / n : null));
      wrap.append(chart(`${step.from} → ${step.to}`, pct(lastOf(r)), sparkline(r, `${step.from} → ${step.to} flow ratio per hour`, pct, degraded ? 'ratio bad' : 'ratio')));
    }
    td.append(wrap);
    return td;
  }

  function syncControls() {
    const bsel = $('breakdown');
    const names = [...new Set(snap.segments.map((s) => s.breakdown))];
    const want = ['*', ...names].join('\n');
    if ([...bsel.options].map((o) => o.value).join('\n') !== want) {
      bsel.replaceChildren(h('option', { value: '*', text: 'every breakdown' }), ...names.map((n) => h('option', { value: n, text: breakdownLabel(n) })));
    }
    bsel.value = names.includes(view.breakdown) ? view.breakdown : '*';
    const wsel = $('window');
    if ([...wsel.options].map((o) => o.value).join('\n') !== snap.windows.join('\n')) {
      wsel.replaceChildren(...snap.windows.map((w) => h('option', { value: w, text: w })));
    }
    if (!snap.windows.includes(view.window)) view.window = snap.windows.includes('1d') ? '1d' : snap.windows[0] || '';
    wsel.value = view.window;
    $('only-degraded').checked = view.onlyDegraded;
  }

  function render() {
    if (!snap) return;
    syncControls();
    const degraded = snap.segments.filter((s) => s.degraded).length;
    $('clock').textContent = clockText(snap.clock);
    $('status').textContent = `${plural(snap.segments.length, 'segment')}, ${degraded} degraded`;
    $('status').dataset.degraded = String(degraded);
    $('updated').textContent = updated ? updated.toLocaleTimeString() : '–';
    $('funnel-head').textContent = `Entities per stage, last ${view.window}`;
    const shown = snap.segments.filter((s) => (view.breakdown === '*' || s.breakdown === view.breakdown) && (!view.onlyDegraded || s.degraded));
    const rows = shown.map((seg) => {
      const v = verdict(seg);
      return h('tr', { class: v.kind, 'data-segment': seg.id, 'data-breakdown': seg.breakdown, 'data-degraded': String(seg.degraded) },
        segmentCell(seg, v), funnelCell(seg, view.window), conversionCell(seg, view.window), trendCell(seg, seg.degraded));
    });
    $('rows').replaceChildren(...rows);
    const filter = view.breakdown === '*' ? 'every breakdown' : `breakdown ${breakdownLabel(view.breakdown)}`;
    $('caption').textContent = `Showing ${nf.format(shown.length)} of ${plural(snap.segments.length, 'segment')} (${filter}${view.onlyDegraded ? ', degraded only' : ''}), degraded first`;
    $('empty').hidden = snap.segments.length > 0;
    $('segments').hidden = snap.segments.length === 0;
  }

  async function getJSON(url) {
    const res = await fetch(url, { cache: 'no-store', headers: { Accept: 'application/json' } });
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return res.json();
  }

  // normalize turns the lists the API leaves out (null) into empty ones.
  function normalize(s) {
    for (const k of ['stages', 'windows', 'steps', 'segments']) s[k] = s[k] || [];
    for (const seg of s.segments) {
      for (const k of ['labels', 'windows', 'flows', 'cohorts', 'alerts']) seg[k] = seg[k] || [];
    }
    return s;
  }

  async function refresh() {
    try {
      const [s, t] = await Promise.all([getJSON('api/v1/segments'), getJSON(`api/v1/trends?hours=${TREND_HOURS + 1}`).catch(() => null)]);
      snap = normalize(s);
      trend = t;
      updated = new Date();
      $('error').hidden = true;
    } catch (err) {
      $('error').textContent = `Cannot reach the processor (${err.message}).` + (updated ? ` Showing data from ${updated.toLocaleTimeString()}.` : '');
      $('error').hidden = false;
    }
    render();
  }

  async function loop() {
    if (!document.hidden || !snap) await refresh();
    setTimeout(loop, REFRESH_MS);
  }

  function onControl() {
    view.breakdown = $('breakdown').value;
    view.window = $('window').value;
    view.onlyDegraded = $('only-degraded').checked;
    writeHash();
    render();
  }

  readHash();
  for (const id of ['breakdown', 'window', 'only-degraded']) $(id).addEventListener('change', onControl);
  $('controls').addEventListener('submit', (e) => e.preventDefault());
  window.addEventListener('hashchange', () => { readHash(); render(); });
  loop();
})();
