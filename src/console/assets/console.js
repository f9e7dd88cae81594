/*
 * tollgate operator console.
 *
 * The page runs under a strict CSP (script-src 'self', style-src 'self'), and almost every
 * string we display (key names, owners, plans, model names) is user-controlled. So the DOM is
 * built with createElement/textContent only; data never goes through innerHTML or attributes
 * that could execute. The admin token lives only in the sign-in input until it is posted;
 * afterwards the session cookie plus an in-memory CSRF token authenticate us.
 */
'use strict';

(function () {
  const REFRESH_MS = 5000;
  const HEALTH_MINUTES = 60;
  const HOUR_MS = 3600 * 1000;
  const DAY_MS = 24 * HOUR_MS;
  const ROUTES = ['keys', 'spend', 'routing', 'health', 'invoices'];
  const ROUTE_TITLES = {
    keys: 'Keys', spend: 'Spend', routing: 'Routing', health: 'Refusals & health', invoices: 'Invoices',
  };
  // Colour-blind-friendly categorical palette, assigned by series order.
  const PALETTE = ['#4e79a7', '#f28e2b', '#59a14f', '#e15759', '#76b7b2',
    '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac'];
  const SESSION_ENDED = 'Your session has ended; sign in again.';

  const state = {
    csrf: null,          // memory only; never persisted
    epoch: 0,            // bumped on sign-in/out so late responses from an old session are dropped
    route: 'keys',
    timer: null,
    busy: false,
    again: false,
    sigs: new Map(),     // last rendered signature per slot, to avoid needless DOM churn
    charts: new Map(),   // container id -> redraw(width) for resize
    keys: { list: [], search: '', sort: { col: 'name', dir: 'asc' }, editing: null, snapshot: null, revoking: null },
    spend: { burnKeyId: null },
    routing: { data: null },
    invoice: { shown: null },
  };

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------------------------------
  // DOM building

  const SAFE_ATTRS = new Set(['id', 'type', 'value', 'title', 'name', 'role', 'colspan', 'rowspan',
    'scope', 'disabled', 'selected', 'hidden', 'tabindex', 'min', 'max', 'step', 'placeholder']);

  /** Element builder that refuses anything able to run code (on*, style, href, src…). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value == null || value === false) continue;
      if (name === 'text') el.textContent = String(value);
      else if (name === 'class') el.className = String(value);
      else if (SAFE_ATTRS.has(name) || /^(aria|data)-[a-z-]+$/.test(name)) {
        el.setAttribute(name, value === true ? '' : String(value));
      } else {
        throw new Error('h(): attribute not allowed: ' + name);
      }
    }
    appendAll(el, children);
    return el;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';

  /** SVG counterpart of h(); presentation attributes only. */
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value == null || value === false) continue;
      if (name === 'text') el.textContent = String(value);
      else if (/^on/i.test(name) || /href$/i.test(name) || name === 'style') {
        throw new Error('s(): attribute not allowed: ' + name);
      } else {
        el.setAttribute(name, String(value));
      }
    }
    appendAll(el, children);
    return el;
  }

  function appendAll(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child == null || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
  }

  function setText(id, text) {
    const el = $(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  /** Returns true (and records it) when `value` differs from what `slot` last rendered. */
  function changed(slot, value) {
    const sig = JSON.stringify(value);
    if (state.sigs.get(slot) === sig) return false;
    state.sigs.set(slot, sig);
    return true;
  }

  // Selects are rebuilt only when their options change, so an open dropdown survives a refresh.
  const selectSigs = new WeakMap();
  function fillSelect(select, options, wanted) {
    const sig = JSON.stringify(options);
    if (selectSigs.get(select) !== sig) {
      select.replaceChildren(...options.map((o) => h('option', { value: o.value, text: o.label, disabled: o.disabled })));
      selectSigs.set(select, sig);
    }
    const usable = options.filter((o) => !o.disabled);
    const value = usable.some((o) => o.value === wanted) ? wanted : (usable.length ? usable[0].value : '');
    select.value = value;
    return value;
  }

  function emptyRow(cols, text) {
    return h('tr', null, h('td', { colspan: cols, class: 'empty', text }));
  }

  function fillTable(tableId, rows, cols, emptyText) {
    const tbody = $(tableId).tBodies[0];
    tbody.replaceChildren(...(rows.length ? rows : [emptyRow(cols, emptyText)]));
  }

  // ---------------------------------------------------------------------------------------
  // Formatting

  function num(v) {
    const n = Number(v);
    return v == null || !Number.isFinite(n) ? 0 : n;
  }

  /** $ with up to 6 significant decimals below $1, cents at or above $1. */
  function formatUSD(v) {
    if (v == null || !Number.isFinite(Number(v))) return '—';
    const n = Number(v);
    const sign = n < 0 ? '-' : '';
    const a = Math.abs(n);
    if (a >= 1) {
      return sign + '$' + a.toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    }
    if (a === 0) return '$0.00';
    const digits = Math.min(20, Math.max(2, 5 - Math.floor(Math.log10(a))));
    const [int, frac = ''] = a.toFixed(digits).replace(/0+$/, '').split('.');
    const text = int + '.' + frac.padEnd(2, '0');
    if (Number(text) >= 1) return sign + '$1.00';
    if (Number(text) === 0) return '$0.00';
    return sign + '$' + text;
  }

  /** Full-precision figure for hover titles. */
  function exactUSD(v) {
    const n = num(v);
    const sign = n < 0 ? '-' : '';
    return sign + '$' + Math.abs(n).toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 12 });
  }

  function formatInt(v) {
    if (v == null || !Number.isFinite(Number(v))) return '—';
    return Math.round(Number(v)).toLocaleString('en-US');
  }

  function formatCount(v) {
    return Number(v).toLocaleString('en-US', { maximumFractionDigits: 2 });
  }

  function formatPct(v) {
    return Number(num(v).toFixed(1)).toLocaleString('en-US') + ' %';
  }

  function parseTime(v) {
    if (v == null || v === '') return null;
    if (typeof v === 'number') return Number.isFinite(v) ? v : null;
    const t = Date.parse(v);
    return Number.isNaN(t) ? null : t;
  }

  /** Usage rows group hours as "2026-12-03T14" (UTC); accept full timestamps too. */
  function parseHour(group) {
    if (typeof group !== 'string') return parseTime(group);
    let g = group.trim().replace(' ', 'T');
    if (/^\d{4}-\d{2}-\d{2}T\d{2}$/.test(g)) g += ':00:00Z';
    else if (/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$/.test(g)) g += 'Z';
    return parseTime(g);
  }

  function localDateTime(ms) {
    if (ms == null) return '—';
    return new Date(ms).toLocaleString(undefined, {
      year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
    });
  }

  function shortDateTime(ms) {
    return new Date(ms).toLocaleString(undefined, { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }

  const pad2 = (n) => String(n).padStart(2, '0');

  function clockTime(ms) {
    const d = new Date(ms);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  /** UTC calendar day N days before today, as YYYY-MM-DD. */
  function utcDayBack(daysBack) {
    const d = new Date();
    d.setUTCHours(0, 0, 0, 0);
    d.setUTCDate(d.getUTCDate() - daysBack);
    return d.toISOString().slice(0, 10);
  }

  /** Every UTC day from `from` (YYYY-MM-DD) through today, so empty days still get a bar. */
  function daysSince(from) {
    const days = [];
    const end = utcDayBack(0);
    for (let t = Date.parse(from + 'T00:00:00Z'); days.length < 400; t += DAY_MS) {
      const day = new Date(t).toISOString().slice(0, 10);
      days.push(day);
      if (day >= end) break;
    }
    return days;
  }

  function dayLabel(day) {
    return new Date(day + 'T00:00:00Z').toLocaleDateString('en-US', { month: 'short', day: 'numeric', timeZone: 'UTC' });
  }

  function currentUtcMonth() {
    return new Date().toISOString().slice(0, 7);
  }

  const enc = encodeURIComponent;

  // ---------------------------------------------------------------------------------------
  // API

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  /** The session ended or changed under us; the caller has nothing to show. */
  class Interrupted extends Error {}

  async function readJson(res) {
    const text = await res.text();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch (_) {
      return null;
    }
  }

  function errorMessage(data, res) {
    const msg = data && data.error && data.error.message;
    if (typeof msg === 'string' && msg) return msg;
    return `Request failed (HTTP ${res.status}${res.statusText ? ' ' + res.statusText : ''}).`;
  }

  async function api(path, { method = 'GET', body } = {}) {
    if (!state.csrf) throw new Interrupted();
    const epoch = state.epoch;
    let res;
    try {
      res = await fetch(path, {
        method,
        credentials: 'same-origin',
        headers: { 'X-CSRF-Token': state.csrf, 'Content-Type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      if (epoch !== state.epoch) throw new Interrupted();
      throw new ApiError('Could not reach the gateway: ' + err.message, 0);
    }
    if (epoch !== state.epoch) throw new Interrupted();
    if (res.status === 401) {
      sessionEnded();
      throw new Interrupted();
    }
    const data = await readJson(res);
    if (epoch !== state.epoch) throw new Interrupted();
    if (!res.ok) throw new ApiError(errorMessage(data, res), res.status);
    return data;
  }

  const listOf = (res) => (res && Array.isArray(res.data) ? res.data : []);

  // ---------------------------------------------------------------------------------------
  // Session

  async function checkSession() {
    try {
      const res = await fetch('/console/session', { credentials: 'same-origin', headers: { Accept: 'application/json' } });
      const data = await readJson(res);
      if (res.ok && data && data.csrf_token) return signedIn(data);
      showSignin(res.status === 401 ? '' : errorMessage(data, res));
    } catch (err) {
      showSignin('Could not reach the gateway: ' + err.message);
    }
  }

  async function onSignin(event) {
    event.preventDefault();
    const input = $('token');
    const submit = $('signin-submit');
    const body = JSON.stringify({ token: input.value });
    // The token must not outlive the request: clear the field before awaiting anything.
    input.value = '';
    submit.disabled = true;
    setText('signin-error', '');
    try {
      const res = await fetch('/console/session', {
        method: 'POST',
        credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json' },
        body,
      });
      const data = await readJson(res);
      if (res.ok && data && data.csrf_token) {
        signedIn(data);
      } else {
        setText('signin-error', res.ok ? 'Unexpected answer from the gateway.' : errorMessage(data, res));
        input.focus();
      }
    } catch (err) {
      setText('signin-error', 'Could not reach the gateway: ' + err.message);
    } finally {
      submit.disabled = false;
    }
  }

  function signedIn(data) {
    state.csrf = data.csrf_token;
    state.epoch++;
    $('signin-view').hidden = true;
    $('app').hidden = false;
    setText('signin-error', '');
    applyRoute();
    clearInterval(state.timer);
    state.timer = setInterval(tick, REFRESH_MS);
  }

  function showSignin(message) {
    $('app').hidden = true;
    $('signin-view').hidden = false;
    setText('signin-error', message || '');
    document.title = 'Sign in · tollgate console';
    $('token').focus();
  }

  /** Forget everything tied to the session, including data already in the DOM. */
  function leaveSession() {
    state.csrf = null;
    state.epoch++;
    clearInterval(state.timer);
    state.timer = null;
    state.busy = false;
    state.again = false;
    for (const dialog of document.querySelectorAll('dialog[open]')) dialog.close();
    $('new-secret').textContent = '';
    state.sigs.clear();
    state.charts.clear();
    state.keys.list = [];
    state.invoice.shown = null;
    state.routing.data = null;
    for (const table of document.querySelectorAll('#app table')) table.tBodies[0].replaceChildren();
    for (const chart of document.querySelectorAll('#app .chart')) chart.replaceChildren();
    for (const id of ['spend-total', 'burn-projection', 'routing-saving', 'invoice-total', 'updated', 'keys-count']) setText(id, '');
    for (const el of document.querySelectorAll('#app .page-error')) el.textContent = '';
    $('invoice-key').replaceChildren(h('option', { value: '', text: 'Choose a key…' }));
    $('burn-key').replaceChildren();
    selectSigs.delete($('invoice-key'));
    selectSigs.delete($('burn-key'));
    updateCsvLink();
  }

  function sessionEnded() {
    if (!state.csrf) return;
    leaveSession();
    showSignin(SESSION_ENDED);
  }

  async function signOut() {
    const csrf = state.csrf;
    leaveSession();
    let message = '';
    try {
      const res = await fetch('/console/session', {
        method: 'DELETE',
        credentials: 'same-origin',
        headers: { 'X-CSRF-Token': csrf || '' },
      });
      if (!res.ok && res.status !== 401) message = 'Sign-out may not have completed: ' + errorMessage(await readJson(res), res);
    } catch (err) {
      message = 'Sign-out may not have completed: ' + err.message;
    }
    showSignin(message);
  }

  // ---------------------------------------------------------------------------------------
  // Routing and refresh

  function routeFromHash() {
    const m = /^#\/([a-z]+)/.exec(location.hash);
    return m && ROUTES.includes(m[1]) ? m[1] : 'keys';
  }

  function applyRoute() {
    const route = routeFromHash();
    if (location.hash !== '#/' + route) history.replaceState(null, '', '#/' + route);
    state.route = route;
    for (const r of ROUTES) {
      $('page-' + r).hidden = r !== route;
      const link = $('nav-' + r);
      if (r === route) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    document.title = ROUTE_TITLES[route] + ' · tollgate console';
    if (state.csrf) refresh();
  }

  const LOADERS = {
    keys: loadKeys, spend: loadSpend, routing: loadRouting, health: loadHealth, invoices: loadInvoices,
  };

  function tick() {
    // Skip while a dialog is open so a form or the one-time secret is never disturbed.
    if (!state.csrf || document.querySelector('dialog[open]')) return;
    refresh();
  }

  /** Reloads the active page; a request made while one is running queues exactly one more. */
  async function refresh() {
    if (!state.csrf) return;
    if (state.busy) {
      state.again = true;
      return;
    }
    state.busy = true;
    const epoch = state.epoch;
    const route = state.route;
    try {
      await LOADERS[route]();
      if (epoch !== state.epoch) return;
      setText(route + '-error', '');
      setText('updated', 'Updated ' + clockTime(Date.now()));
    } catch (err) {
      if (err instanceof Interrupted || epoch !== state.epoch) return;
      setText(route + '-error', err.message || String(err));
      console.error(err);
    } finally {
      if (epoch === state.epoch) {
        state.busy = false;
        if (state.again) {
          state.again = false;
          refresh();
        }
      }
    }
  }

  // ---------------------------------------------------------------------------------------
  // Charts

  const color = (i) => PALETTE[i % PALETTE.length];

  /** 4–5 round ticks covering [min, max]. */
  function niceTicks(min, max, integer) {
    if (!(max > min)) max = min + 1;
    const raw = (max - min) / 4;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const norm = raw / mag;
    let step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
    if (integer) step = Math.max(1, Math.ceil(step));
    const lo = Math.floor(min / step + 1e-9) * step;
    let hi = Math.ceil(max / step - 1e-9) * step;
    if (hi <= lo) hi = lo + step;
    const ticks = [];
    for (let i = 0; lo + i * step <= hi + step * 1e-6; i++) ticks.push(Number((lo + i * step).toPrecision(12)));
    return { ticks, lo, hi };
  }

  function chartWidth(container) {
    const w = container.clientWidth;
    return Math.round(Math.min(1400, Math.max(300, w || 720)));
  }

  /**
   * Draws into `id` with `build(width)`, measuring the container so SVG text keeps its size;
   * the viewBox then lets the browser scale it if the container changes before the next draw.
   */
  function drawChart(id, sig, build) {
    const container = $(id);
    const width = chartWidth(container);
    state.charts.set(id, build);
    if (!changed('chart:' + id, [sig, width])) return;
    container.replaceChildren(build(width));
  }

  function redrawCharts() {
    for (const [id, build] of state.charts) {
      const container = $(id);
      if (!container || container.offsetParent === null) continue;
      const width = chartWidth(container);
      const prev = state.sigs.get('chart:' + id);
      const sig = prev ? JSON.parse(prev)[0] : null;
      if (!changed('chart:' + id, [sig, width])) continue;
      container.replaceChildren(build(width));
    }
  }

  function legend(items) {
    return h('ul', { class: 'legend' }, items.map((item) => {
      const sw = h('span', { class: item.line ? 'swatch line' + (item.dashed ? ' dashed' : '') : 'swatch', 'aria-hidden': 'true' });
      // CSSOM assignment is allowed by style-src 'self'; style attributes are not.
      if (item.line) sw.style.borderTopColor = item.color;
      else sw.style.backgroundColor = item.color;
      return h('li', null, sw, item.name);
    }));
  }

  function yAxis(svg, ticks, y, m, width, format) {
    for (const t of ticks) {
      const yy = y(t);
      svg.append(
        s('line', { class: 'grid', x1: m.left, x2: width - m.right, y1: yy, y2: yy }),
        s('text', { x: m.left - 6, y: yy + 4, 'text-anchor': 'end', text: format(t) }),
      );
    }
  }

  /**
   * Stacked bars: categories on x, series stacked bottom-up in the given order.
   * opts: { categories, labels, series: [{name, values}], format, exact, integer, label }
   */
  function stackedBarChart(width, opts) {
    const { categories, labels, series, format, exact, integer, label, emptyText = 'No data for this range' } = opts;
    const H = 240;
    const m = { top: 10, right: 10, bottom: 26, left: 74 };
    const pw = width - m.left - m.right;
    const ph = H - m.top - m.bottom;
    const totals = categories.map((_, i) => series.reduce((t, se) => t + Math.max(0, num(se.values[i])), 0));
    const { ticks, lo, hi } = niceTicks(0, Math.max(0, ...totals), integer);
    const y = (v) => m.top + ph - ((v - lo) / (hi - lo)) * ph;
    const n = Math.max(1, categories.length);
    const slot = pw / n;
    const bw = Math.min(48, Math.max(1, slot * (n > 60 ? 0.8 : 0.7)));

    const svg = s('svg', {
      viewBox: `0 0 ${width} ${H}`, width: '100%', role: 'img', 'aria-label': label, class: 'chart-svg',
    });
    yAxis(svg, ticks, y, m, width, format);

    categories.forEach((cat, i) => {
      const x0 = m.left + i * slot + (slot - bw) / 2;
      const g = s('g');
      g.append(s('rect', { class: 'slot', x: x0, y: m.top, width: bw, height: ph },
        s('title', { text: `${labels[i]}: ${exact(totals[i])} in total` })));
      let acc = 0;
      series.forEach((se, si) => {
        const v = Math.max(0, num(se.values[i]));
        if (v <= 0) return;
        const top = y(acc + v);
        const bottom = y(acc);
        g.append(s('rect', {
          class: 'seg', x: x0, y: top, width: bw, height: Math.max(0.75, bottom - top), fill: color(si),
        }, s('title', { text: `${se.name} · ${labels[i]}: ${exact(v)}` })));
        acc += v;
      });
      svg.append(g);
    });

    const every = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(pw / 58))));
    categories.forEach((_, i) => {
      if ((n - 1 - i) % every !== 0) return; // anchor labels on the latest category
      svg.append(s('text', { x: m.left + (i + 0.5) * slot, y: H - 8, 'text-anchor': 'middle', text: labels[i] }));
    });
    svg.append(s('line', { class: 'axis', x1: m.left, x2: width - m.right, y1: y(lo), y2: y(lo) }));

    if (!totals.some((t) => t > 0)) {
      svg.append(s('text', { class: 'empty-text', x: m.left + pw / 2, y: m.top + ph / 2, text: emptyText }));
    }
    return h('div', { class: 'chart-box' }, svg,
      series.length ? legend(series.map((se, i) => ({ name: se.name, color: color(i) }))) : null);
  }

  /**
   * Lines over a time axis with a horizontal zero line.
   * opts: { xMin, xMax, yMin, yMax, series: [{name, points:[[t,v]], dashed, color}], markers, format, label }
   */
  function lineChart(width, opts) {
    const { xMin, xMax, yMin, yMax, series, markers = [], format, label } = opts;
    const H = 240;
    const m = { top: 10, right: 16, bottom: 26, left: 74 };
    const pw = width - m.left - m.right;
    const ph = H - m.top - m.bottom;
    const { ticks, lo, hi } = niceTicks(Math.min(0, yMin), Math.max(0, yMax), false);
    const span = Math.max(1, xMax - xMin);
    const x = (t) => m.left + ((Math.min(xMax, Math.max(xMin, t)) - xMin) / span) * pw;
    const y = (v) => m.top + ph - ((v - lo) / (hi - lo)) * ph;

    const svg = s('svg', {
      viewBox: `0 0 ${width} ${H}`, width: '100%', role: 'img', 'aria-label': label, class: 'chart-svg',
    });
    yAxis(svg, ticks, y, m, width, format);

    const count = Math.max(2, Math.min(5, Math.floor(pw / 120)));
    const fmt = span <= 3 * DAY_MS ? shortDateTime : (t) => new Date(t).toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
    for (let i = 0; i <= count; i++) {
      const t = xMin + (span * i) / count;
      const anchor = i === 0 ? 'start' : i === count ? 'end' : 'middle';
      svg.append(s('text', { x: x(t), y: H - 8, 'text-anchor': anchor, text: fmt(t) }));
    }
    svg.append(s('line', { class: 'axis', x1: m.left, x2: m.left, y1: m.top, y2: m.top + ph }));
    svg.append(s('line', { class: 'zero-line', x1: m.left, x2: width - m.right, y1: y(0), y2: y(0) },
      s('title', { text: 'Cap reached ($0 remaining)' })));

    for (const mk of markers) {
      if (mk.vertical) svg.append(s('line', { class: 'now-line', x1: x(mk.t), x2: x(mk.t), y1: m.top, y2: m.top + ph }));
    }
    for (const se of series) {
      if (se.points.length < 2) continue;
      const d = se.points.map((p, i) => `${i ? 'L' : 'M'}${x(p[0]).toFixed(1)} ${y(p[1]).toFixed(1)}`).join(' ');
      svg.append(s('path', {
        d, fill: 'none', stroke: se.color, 'stroke-width': 2, 'stroke-linejoin': 'round',
        'stroke-dasharray': se.dashed ? '6 4' : null,
      }, s('title', { text: se.name })));
    }
    for (const mk of markers) {
      if (mk.value == null) continue;
      svg.append(s('circle', { cx: x(mk.t), cy: y(mk.value), r: 4, fill: mk.color, stroke: '#fff', 'stroke-width': 1.5 },
        s('title', { text: mk.title })));
    }
    return h('div', { class: 'chart-box' }, svg, legend([
      ...series.map((se) => ({ name: se.name, color: se.color, line: true, dashed: se.dashed })),
      { name: 'Zero (cap reached)', color: '#8a94a0', line: true },
    ]));
  }

  /** Turns usage rows into per-day series for stackedBarChart. */
  function seriesByDay(rows, days, field) {
    const index = new Map(days.map((d, i) => [d, i]));
    const bySplit = new Map();
    for (const row of rows) {
      const i = index.get(String(row.group).slice(0, 10));
      if (i === undefined) continue;
      const name = row.split == null || row.split === '' ? '(none)' : String(row.split);
      if (!bySplit.has(name)) bySplit.set(name, new Array(days.length).fill(0));
      bySplit.get(name)[i] += num(row[field]);
    }
    // Alphabetical so a series keeps its colour from one refresh to the next.
    return [...bySplit.keys()].sort((a, b) => a.localeCompare(b)).map((name) => ({ name, values: bySplit.get(name) }));
  }

  function drawDaily(id, res, days, field, label) {
    const series = seriesByDay(listOf(res), days, field);
    const money = field === 'cost_usd';
    drawChart(id, [days, series, field], (width) => stackedBarChart(width, {
      categories: days,
      labels: days.map(dayLabel),
      series,
      format: money ? formatUSD : formatCount,
      exact: money ? exactUSD : (v) => formatInt(v) + ' requests',
      integer: !money,
      label,
    }));
  }

  // ---------------------------------------------------------------------------------------
  // Keys page

  const SEARCH_FIELDS = ['name', 'id', 'prefix', 'owner', 'team', 'customer', 'plan'];

  const SORTERS = {
    name: (k) => String(k.name || '').toLowerCase(),
    owner: (k) => [k.owner, k.team, k.customer].map((v) => String(v || '').toLowerCase()).join('\u0000'),
    plan: (k) => String(k.plan || 'list').toLowerCase(),
    spend: (k) => num(k.spend_usd),
    reserved: (k) => num(k.reserved_usd),
    resets: (k) => parseTime(k.resets_at) ?? Infinity,
    limits: (k) => (k.rpm == null ? Infinity : num(k.rpm)),
    status: (k) => (k.revoked ? 1 : 0),
  };

  async function loadKeys() {
    state.keys.list = listOf(await api('/admin/keys'));
    renderKeys();
  }

  function matchesSearch(key, q) {
    if (!q) return true;
    return SEARCH_FIELDS.some((f) => {
      const v = f === 'plan' ? (key.plan ?? 'list') : key[f];
      return v != null && String(v).toLowerCase().includes(q);
    });
  }

  function compareKeys(a, b) {
    const { col, dir } = state.keys.sort;
    const get = SORTERS[col] || SORTERS.name;
    const va = get(a);
    const vb = get(b);
    let c = typeof va === 'string' ? va.localeCompare(vb) : (va === vb ? 0 : va < vb ? -1 : 1);
    if (c === 0) c = SORTERS.name(a).localeCompare(SORTERS.name(b)) || String(a.id).localeCompare(String(b.id));
    return dir === 'desc' ? -c : c;
  }

  function renderKeys() {
    const k = state.keys;
    updateSortHeaders();
    if (!changed('keys', [k.list, k.search, k.sort])) return;
    const q = k.search.trim().toLowerCase();
    const rows = k.list.filter((key) => matchesSearch(key, q)).sort(compareKeys);
    const tbody = $('keys-body');
    const focus = rememberRowFocus(tbody);
    tbody.replaceChildren(...(rows.length ? rows.map(keyRow)
      : [emptyRow(9, k.list.length ? 'No keys match the search.' : 'No keys yet. Create one with “New key”.')]));
    restoreRowFocus(tbody, focus);
    setText('keys-count', q ? `${rows.length} of ${k.list.length} keys` : `${k.list.length} keys`);
  }

  function periodSuffix(period) {
    switch (period) {
      case 'day': return ' per day';
      case 'week': return ' per week';
      case 'month': return ' per month';
      case 'total': return ' in total';
      default: return period ? ' per ' + period : '';
    }
  }

  function spendCell(key) {
    const spend = num(key.spend_usd);
    const cap = key.budget_usd;
    const td = h('td', { class: 'key-spend' });
    if (cap != null) {
      const frac = num(cap) > 0 ? spend / num(cap) : (spend > 0 ? 1 : 0);
      const fill = h('div', { class: 'bar-fill' + (frac >= 0.9 ? ' danger' : frac >= 0.75 ? ' warn' : '') });
      fill.style.width = Math.min(100, Math.max(0, frac * 100)).toFixed(1) + '%';
      td.append(h('div', { class: 'bar', 'aria-hidden': 'true', title: (frac * 100).toFixed(1) + ' % of cap' }, fill));
    }
    const capText = cap == null ? 'no cap' : formatUSD(cap) + periodSuffix(key.budget_period);
    td.append(h('div', { class: 'bar-text', text: `${formatUSD(spend)} / ${capText}` }));
    return td;
  }

  function limitsText(key) {
    const parts = [];
    if (key.rpm != null) parts.push(formatInt(key.rpm) + ' rpm');
    if (key.tpm != null) parts.push(formatInt(key.tpm) + ' tpm');
    if (key.max_concurrency != null) parts.push(formatInt(key.max_concurrency) + ' conc');
    if (key.max_usd_per_minute != null) parts.push(formatUSD(key.max_usd_per_minute) + '/min');
    if (key.max_usd_per_hour != null) parts.push(formatUSD(key.max_usd_per_hour) + '/h');
    return parts.length ? parts.join(' · ') : '—';
  }

  function resetsText(key) {
    if (key.budget_period === 'total') return 'never';
    const t = parseTime(key.resets_at);
    return t == null ? (key.budget_usd == null ? '—' : 'never') : localDateTime(t);
  }

  function keyRow(key) {
    const labels = [key.owner, key.team, key.customer].filter((v) => v != null && v !== '');
    const models = Array.isArray(key.models) && key.models.length ? 'models: ' + key.models.join(', ') : null;
    return h('tr', { 'data-key-id': key.id, 'data-key-name': key.name, class: key.revoked ? 'revoked' : null },
      h('td', { class: 'key-name' },
        h('span', { class: 'name', text: key.name }),
        h('span', { class: 'sub mono', text: key.prefix ? key.prefix + '…' : key.id })),
      h('td', null,
        h('span', { text: labels.length ? labels.join(' / ') : '—' }),
        models ? h('span', { class: 'sub', text: models }) : null),
      h('td', { text: key.plan ?? 'list' }),
      spendCell(key),
      h('td', { class: 'num', text: formatUSD(num(key.reserved_usd)) }),
      h('td', { text: resetsText(key) }),
      h('td', { text: limitsText(key) }),
      h('td', { class: 'key-status' },
        h('span', { class: 'badge ' + (key.revoked ? 'revoked' : 'active'), text: key.revoked ? 'revoked' : 'active' })),
      h('td', { class: 'actions' }, key.revoked ? null : [
        h('button', { type: 'button', class: 'edit-key', text: 'Edit' }),
        h('button', { type: 'button', class: 'revoke-key', text: 'Revoke' }),
      ]));
  }

  // Live refresh rebuilds rows; put keyboard focus back on the same button afterwards.
  function rememberRowFocus(tbody) {
    const el = document.activeElement;
    if (!el || !tbody.contains(el)) return null;
    const tr = el.closest('tr');
    return tr ? { id: tr.dataset.keyId, cls: el.classList[0] } : null;
  }

  function restoreRowFocus(tbody, focus) {
    if (!focus) return;
    const tr = Array.from(tbody.rows).find((r) => r.dataset.keyId === focus.id);
    const target = tr && focus.cls ? tr.getElementsByClassName(focus.cls)[0] : null;
    if (target) target.focus();
  }

  function updateSortHeaders() {
    const { col, dir } = state.keys.sort;
    for (const btn of document.querySelectorAll('#keys-table th button.sort')) {
      const th = btn.closest('th');
      th.setAttribute('aria-sort', btn.dataset.sort === col ? (dir === 'asc' ? 'ascending' : 'descending') : 'none');
    }
  }

  function onSortClick(event) {
    const btn = event.target.closest('button.sort');
    if (!btn) return;
    const sort = state.keys.sort;
    if (sort.col === btn.dataset.sort) sort.dir = sort.dir === 'asc' ? 'desc' : 'asc';
    else {
      sort.col = btn.dataset.sort;
      sort.dir = 'asc';
    }
    renderKeys();
  }

  function findKey(id) {
    return state.keys.list.find((k) => k.id === id) || null;
  }

  function onKeysTableClick(event) {
    const btn = event.target.closest('button.edit-key, button.revoke-key');
    if (!btn) return;
    const key = findKey(btn.closest('tr').dataset.keyId);
    if (!key) return;
    if (btn.classList.contains('edit-key')) openKeyDialog(key);
    else openRevokeDialog(key);
  }

  // ---- key dialog

  const FORM_FIELDS = [
    { id: 'f-name', key: 'name', kind: 'text' },
    { id: 'f-owner', key: 'owner', kind: 'text' },
    { id: 'f-team', key: 'team', kind: 'text' },
    { id: 'f-customer', key: 'customer', kind: 'text' },
    { id: 'f-plan', key: 'plan', kind: 'text' },
    { id: 'f-budget', key: 'budget_usd', kind: 'number' },
    { id: 'f-period', key: 'budget_period', kind: 'select' },
    { id: 'f-rpm', key: 'rpm', kind: 'number' },
    { id: 'f-tpm', key: 'tpm', kind: 'number' },
    { id: 'f-concurrency', key: 'max_concurrency', kind: 'number' },
    { id: 'f-models', key: 'models', kind: 'list' },
  ];

  /** Normalised form values; an empty field reads as null. */
  function readKeyForm() {
    const out = {};
    for (const f of FORM_FIELDS) {
      const raw = $(f.id).value.trim();
      if (raw === '') out[f.key] = null;
      else if (f.kind === 'number') out[f.key] = Number(raw);
      else if (f.kind === 'list') {
        const list = raw.split(',').map((x) => x.trim()).filter(Boolean);
        out[f.key] = list.length ? list : null;
      } else out[f.key] = raw;
    }
    return out;
  }

  function openKeyDialog(key) {
    const k = state.keys;
    k.editing = key;
    const form = $('key-form');
    form.reset();
    setText('key-dialog-title', key ? `Edit key ${key.name}` : 'New key');
    setText('key-form-error', '');
    if (key) {
      for (const f of FORM_FIELDS) {
        const v = key[f.key];
        if (f.kind === 'list') $(f.id).value = Array.isArray(v) ? v.join(', ') : '';
        else if (f.kind === 'select') $(f.id).value = v || 'month';
        else $(f.id).value = v == null ? '' : String(v);
      }
    }
    // Diff against what the form showed, so untouched fields are never sent.
    k.snapshot = key ? readKeyForm() : null;
    $('key-dialog').showModal();
    $('f-name').focus();
  }

  async function onKeySubmit(event) {
    event.preventDefault();
    const k = state.keys;
    const editing = k.editing;
    const values = readKeyForm();
    for (const f of FORM_FIELDS) {
      if (f.kind === 'number' && values[f.key] != null && !Number.isFinite(values[f.key])) {
        setText('key-form-error', `${$(f.id).labels[0].textContent} must be a number.`);
        $(f.id).focus();
        return;
      }
    }
    const body = {};
    for (const f of FORM_FIELDS) {
      const v = values[f.key];
      if (editing) {
        if (JSON.stringify(v) !== JSON.stringify(k.snapshot[f.key])) body[f.key] = v;
      } else if (v !== null) {
        body[f.key] = v;
      }
    }
    if (editing && Object.keys(body).length === 0) {
      $('key-dialog').close();
      return;
    }
    const save = $('key-save');
    save.disabled = true;
    setText('key-form-error', '');
    try {
      const res = editing
        ? await api('/admin/keys/' + enc(editing.id), { method: 'PATCH', body })
        : await api('/admin/keys', { method: 'POST', body });
      $('key-dialog').close();
      if (!editing) showSecret(res && res.key);
      refresh();
    } catch (err) {
      if (!(err instanceof Interrupted)) setText('key-form-error', err.message);
    } finally {
      save.disabled = false;
    }
  }

  function onKeyDialogClose() {
    state.keys.editing = null;
    state.keys.snapshot = null;
    $('key-form').reset();
    setText('key-form-error', '');
  }

  // ---- one-time secret

  function showSecret(secret) {
    $('new-secret').textContent = secret || '(the gateway did not return a secret)';
    setText('copy-feedback', '');
    $('secret-dialog').showModal();
    $('copy-secret').focus();
  }

  function selectSecret() {
    const range = document.createRange();
    range.selectNodeContents($('new-secret'));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  async function onCopySecret() {
    const text = $('new-secret').textContent;
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        setText('copy-feedback', 'Copied');
        return;
      } catch (_) {
        // fall through to manual selection
      }
    }
    selectSecret();
    setText('copy-feedback', 'Selected: press Ctrl+C (⌘C) to copy');
  }

  function onSecretClose() {
    $('new-secret').textContent = '';
    setText('copy-feedback', '');
    const sel = window.getSelection();
    if (sel) sel.removeAllRanges();
  }

  // ---- revoke

  function openRevokeDialog(key) {
    state.keys.revoking = key;
    setText('confirm-text', `Revoke key ${key.name}? Its requests are refused from now on. This cannot be undone.`);
    setText('confirm-error', '');
    $('confirm-yes').disabled = false;
    $('confirm-dialog').showModal();
    $('confirm-no').focus();
  }

  async function onConfirmRevoke() {
    const key = state.keys.revoking;
    if (!key) return;
    const yes = $('confirm-yes');
    yes.disabled = true;
    try {
      await api('/admin/keys/' + enc(key.id), { method: 'DELETE' });
      $('confirm-dialog').close();
      refresh();
    } catch (err) {
      if (!(err instanceof Interrupted)) setText('confirm-error', err.message);
    } finally {
      yes.disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Spend page

  async function loadSpend() {
    const days = Number($('spend-range').value) || 30;
    const from = utcDayBack(days - 1);
    const [byModel, byTier, byKey, keysRes] = await Promise.all([
      api(`/admin/usage?group_by=day&split_by=model&from=${from}`),
      api(`/admin/usage?group_by=day&split_by=tier&from=${from}`),
      api(`/admin/usage?group_by=key&from=${from}`),
      api('/admin/keys'),
    ]);
    const dayList = daysSince(from);
    const totals = (byModel && byModel.totals) || {};
    setText('spend-total', `${formatUSD(num(totals.cost_usd))} across ${formatInt(num(totals.requests))} requests in the last ${days} days.`);
    drawDaily('chart-spend-model', byModel, dayList, 'cost_usd', `Cost per day by model, last ${days} days`);
    drawDaily('chart-spend-tier', byTier, dayList, 'cost_usd', `Cost per day by tier, last ${days} days`);
    renderTopKeys(listOf(byKey));

    const capped = listOf(keysRes).filter((k) => !k.revoked && k.budget_usd != null)
      .sort((a, b) => String(a.name).localeCompare(String(b.name)));
    const options = capped.length
      ? capped.map((k) => ({ value: k.id, label: k.name }))
      : [{ value: '', label: 'No active key has a budget', disabled: true }];
    const id = fillSelect($('burn-key'), options, state.spend.burnKeyId);
    state.spend.burnKeyId = id || state.spend.burnKeyId;
    if (!id) {
      state.charts.delete('chart-burn');
      state.sigs.delete('chart:chart-burn');
      $('chart-burn').replaceChildren(h('p', { class: 'chart-empty', text: 'Give a key a budget to see its burn-down.' }));
      setText('burn-projection', '');
      return;
    }
    const key = await api('/admin/keys/' + enc(id));
    const periodStart = key && key.period_start;
    const hourly = periodStart
      ? await api(`/admin/usage?key_id=${enc(id)}&group_by=hour&from=${enc(periodStart)}`)
      : null;
    if (state.spend.burnKeyId !== id) return; // selection changed while loading; next refresh draws it
    renderBurn(key, listOf(hourly));
  }

  function renderTopKeys(rows) {
    if (!changed('top-keys', rows)) return;
    const top = rows.slice().sort((a, b) => num(b.cost_usd) - num(a.cost_usd)).slice(0, 10);
    fillTable('top-keys', top.map((r) => h('tr', { 'data-key-id': r.group },
      h('td', null,
        h('span', { text: r.key_name ?? r.group ?? '—' }),
        r.key_name != null ? h('span', { class: 'muted small', text: ' ' + r.group }) : null),
      h('td', { class: 'num', text: formatInt(r.requests) }),
      h('td', { class: 'num', text: formatInt(r.input_tokens) }),
      h('td', { class: 'num', text: formatInt(r.output_tokens) }),
      h('td', { class: 'num', text: formatUSD(num(r.cost_usd)), title: exactUSD(r.cost_usd) }),
    )), 5, 'No usage in this range.');
  }

  function renderBurn(key, rows) {
    const now = Date.now();
    const budget = num(key.budget_usd);
    const start = parseTime(key.period_start) ?? now;
    const end = parseTime(key.resets_at);
    const capAt = parseTime(key.cap_reached_at);
    const spend = num(key.spend_usd);
    const pace = num(key.pace_usd_per_hour);
    const remNow = budget - spend;

    const hours = rows.map((r) => ({ t: parseHour(r.group), cost: num(r.cost_usd) }))
      .filter((r) => r.t != null)
      .sort((a, b) => a.t - b.t);
    const actual = [[start, budget]];
    let rem = budget;
    let lastX = start;
    // Each hour's cost is spread across that hour, clipped to [period start, now].
    for (const { t, cost } of hours) {
      const a = Math.min(now, Math.max(t, lastX));
      const b = Math.min(now, Math.max(t + HOUR_MS, a));
      actual.push([a, rem]);
      rem -= cost;
      actual.push([b, rem]);
      lastX = b;
    }
    actual.push([now, remNow]);

    let xMax = end ?? Math.max(now, capAt ?? now);
    if (xMax <= start) xMax = start + HOUR_MS;
    let projection = [];
    if (remNow > 0) {
      if (capAt != null && capAt > now) projection = [[now, remNow], [capAt, 0]];
      else if (end != null && end > now) projection = [[now, remNow], [end, remNow - (pace * (end - now)) / HOUR_MS]];
    }

    const ys = actual.concat(projection).map((p) => p[1]);
    const series = [{ name: 'Remaining budget', points: actual, color: PALETTE[0] }];
    if (projection.length) series.push({ name: `Projection at ${formatUSD(pace)}/h`, points: projection, color: PALETTE[1], dashed: true });
    const markers = [{ t: now, value: remNow, color: PALETTE[0], vertical: true, title: `Now: ${exactUSD(remNow)} remaining` }];

    drawChart('chart-burn', [key.id, budget, start, end, capAt, spend, pace, hours, Math.floor(now / 60000)],
      (width) => lineChart(width, {
        xMin: start, xMax, yMin: Math.min(0, ...ys), yMax: Math.max(budget, ...ys),
        series, markers, format: formatUSD,
        label: `Remaining budget of ${key.name} over the current period`,
      }));

    let text;
    if (spend <= 0 && pace <= 0) text = 'No spend yet this period.';
    else if (capAt != null && capAt <= now) text = `The cap was reached at ${localDateTime(capAt)}.`;
    else if (capAt != null) text = `At ${formatUSD(pace)}/h the cap is reached at ${localDateTime(capAt)}.`;
    else if (end != null) text = `At the current rate (${formatUSD(pace)}/h) the cap is not reached before the period resets at ${localDateTime(end)}.`;
    else text = `At the current rate (${formatUSD(pace)}/h) the cap is not reached.`;
    setText('burn-projection', text);
  }

  // ---------------------------------------------------------------------------------------
  // Routing page

  async function loadRouting() {
    const days = Number($('routing-range').value) || 30;
    const from = utcDayBack(days - 1);
    const [byRule, byTier, savings] = await Promise.all([
      api(`/admin/usage?group_by=day&split_by=rule&from=${from}`),
      api(`/admin/usage?group_by=day&split_by=tier&from=${from}`),
      api(`/admin/routing/savings?from=${from}`),
    ]);
    state.routing.data = { days, dayList: daysSince(from), byRule, byTier, savings };
    renderRouting();
  }

  function renderRouting() {
    const data = state.routing.data;
    if (!data) return;
    const metric = $('routing-metric').value === 'requests' ? 'requests' : 'cost_usd';
    const what = metric === 'requests' ? 'Requests' : 'Cost';
    setText('route-rule-title', `${what} per day by rule`);
    setText('route-tier-title', `${what} per day by tier`);
    drawDaily('chart-route-rule', data.byRule, data.dayList, metric, `${what} per day by routing rule, last ${data.days} days`);
    drawDaily('chart-route-tier', data.byTier, data.dayList, metric, `${what} per day by tier, last ${data.days} days`);

    const sv = data.savings || {};
    const tier = sv.baseline_tier || 'frontier';
    setText('routing-baseline-head', tier.charAt(0).toUpperCase() + tier.slice(1) + ' cost');
    let text;
    if (!num(sv.requests)) {
      text = `No auto-routed requests in the last ${data.days} days.`;
    } else {
      const saving = num(sv.saving_usd);
      const pair = `(${formatUSD(num(sv.baseline_cost_usd))} → ${formatUSD(num(sv.cost_usd))})`;
      const pct = sv.saving_pct == null ? '' : ` (${formatPct(Math.abs(num(sv.saving_pct)))})`;
      text = saving >= 0
        ? `Routing saved ${formatUSD(saving)}${pct} against sending every auto request to the ${tier} tier ${pair}.`
        : `Routing cost ${formatUSD(-saving)}${pct} more than sending every auto request to the ${tier} tier ${pair}.`;
    }
    setText('routing-saving', text);

    const rows = listOf(sv).slice().sort((a, b) => num(b.cost_usd) - num(a.cost_usd));
    if (changed('routing-table', rows)) {
      fillTable('routing-table', rows.map((r) => h('tr', null,
        h('td', { text: r.rule ?? '—' }),
        h('td', { text: r.model ?? '—' }),
        h('td', { class: 'num', text: formatInt(r.requests) }),
        h('td', { class: 'num', text: formatUSD(num(r.cost_usd)), title: exactUSD(r.cost_usd) }),
        h('td', { class: 'num', text: formatUSD(num(r.baseline_cost_usd)), title: exactUSD(r.baseline_cost_usd) }),
      )), 5, 'No routed requests in this range.');
    }
  }

  // ---------------------------------------------------------------------------------------
  // Refusals & health page

  function counters(obj) {
    const out = {};
    if (obj && typeof obj === 'object') for (const [k, v] of Object.entries(obj)) out[k] = num(v);
    return out;
  }

  async function loadHealth() {
    renderHealth((await api('/admin/health')) || {});
  }

  /**
   * The server keeps what each minute added over the last day (quiet minutes left out, the
   * minute so far last); this lays the last HEALTH_MINUTES of it out one bar per minute.
   */
  function minuteSeries(history, field, now) {
    const minute = 60 * 1000;
    const end = Math.floor(now / minute) * minute;
    const categories = [];
    for (let i = HEALTH_MINUTES - 1; i >= 0; i--) categories.push(end - i * minute);
    const byName = new Map();
    for (const entry of history) {
      const at = Date.parse(entry.at);
      const slot = HEALTH_MINUTES - 1 - Math.floor((end - Math.floor(at / minute) * minute) / minute);
      if (!(slot >= 0 && slot < HEALTH_MINUTES)) continue;
      for (const [name, n] of Object.entries(counters(entry[field]))) {
        if (!byName.has(name)) byName.set(name, new Array(HEALTH_MINUTES).fill(0));
        byName.get(name)[slot] += n;
      }
    }
    const series = [...byName.keys()].sort((a, b) => a.localeCompare(b))
      .map((name) => ({ name, values: byName.get(name) }));
    return { categories, series };
  }

  function drawHealthChart(id, data, field, label, emptyText) {
    const now = Date.parse(data.at) || Date.now();
    const { categories, series } = minuteSeries(Array.isArray(data.history) ? data.history : [], field, now);
    const labels = categories.map((ms) => clockTime(ms).slice(0, 5));
    drawChart(id, [categories, series], (width) => stackedBarChart(width, {
      categories, labels, series, format: formatCount, exact: formatInt, integer: true, label, emptyText,
    }));
  }

  function renderHealth(data) {
    drawHealthChart('chart-refusals', data, 'refusals', 'Refusals per minute, by reason',
      'No refusals in the last hour');
    drawHealthChart('chart-errors', data, 'errors_by_model', 'Server errors per minute, by model',
      'No server errors in the last hour');

    const byCount = (obj) => Object.entries(counters(obj)).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    fillTable('refusal-totals', byCount(data.refusals).map(([reason, n]) => h('tr', null,
      h('td', { text: reason }), h('td', { class: 'num', text: formatInt(n) }))), 2, 'No refusals.');
    fillTable('error-totals', byCount(data.errors_by_model).map(([model, n]) => h('tr', null,
      h('td', { text: model }), h('td', { class: 'num', text: formatInt(n) }))), 2, 'No upstream errors.');
    const attempts = Object.entries(data.upstream_attempts || {}).sort((a, b) => a[0].localeCompare(b[0]));
    // Results other than `ok` are the provider's 429s, 4xx, 5xx, timeouts and unreachables.
    const failed = (c) => Object.entries(counters(c)).reduce((sum, [result, n]) => sum + (result === 'ok' ? 0 : n), 0);
    fillTable('upstream-totals', attempts.map(([provider, c]) => h('tr', null,
      h('td', { text: provider }),
      h('td', { class: 'num', text: formatInt(num(c && c.ok)) }),
      h('td', { class: 'num', text: formatInt(failed(c)) }))), 3, 'No upstream attempts yet.');

    const ledger = data.ledger || {};
    for (const field of ['pending', 'written', 'dropped', 'failed']) {
      const el = $('ledger-' + field);
      const v = ledger[field];
      el.textContent = v == null ? '—' : formatInt(v);
      el.classList.toggle('bad', (field === 'dropped' || field === 'failed') && num(v) > 0);
    }
  }

  // ---------------------------------------------------------------------------------------
  // Invoices page

  function invoiceSelection() {
    const id = $('invoice-key').value;
    const period = $('invoice-month').value.trim();
    return { id, period, valid: Boolean(id) && /^\d{4}-\d{2}$/.test(period) };
  }

  function updateCsvLink() {
    const link = $('invoice-csv');
    const { id, period, valid } = invoiceSelection();
    // Only ever a same-origin path built from the chosen key id; no token is involved.
    if (valid) link.href = `/admin/invoices/${enc(id)}?period=${enc(period)}&format=csv`;
    else link.removeAttribute('href');
  }

  async function loadInvoices() {
    const keys = listOf(await api('/admin/keys'))
      .slice().sort((a, b) => (a.revoked - b.revoked) || String(a.name).localeCompare(String(b.name)));
    const select = $('invoice-key');
    const options = [{ value: '', label: 'Choose a key…' },
      ...keys.map((k) => ({ value: k.id, label: k.revoked ? `${k.name} (revoked)` : k.name }))];
    const wanted = select.value || (state.invoice.shown && state.invoice.shown.id) || '';
    if (selectSigs.get(select) !== JSON.stringify(options)) {
      select.replaceChildren(...options.map((o) => h('option', { value: o.value, text: o.label })));
      selectSigs.set(select, JSON.stringify(options));
    }
    select.value = options.some((o) => o.value === wanted) ? wanted : '';
    updateCsvLink();

    const shown = state.invoice.shown;
    if (!shown) return;
    let invoice;
    try {
      invoice = await api(`/admin/invoices/${enc(shown.id)}?period=${enc(shown.period)}`);
    } catch (err) {
      if (!(err instanceof Interrupted)) clearInvoice();
      throw err;
    }
    if (state.invoice.shown !== shown) return;
    renderInvoice(invoice || {});
  }

  function clearInvoice() {
    state.sigs.delete('invoice');
    fillTable('invoice-lines', [], 4, 'No invoice shown.');
    setText('invoice-total', '');
  }

  function renderInvoice(inv) {
    if (!changed('invoice', inv)) return;
    const lines = Array.isArray(inv.lines) ? inv.lines : [];
    fillTable('invoice-lines', lines.map((line) => h('tr', null,
      h('td', { class: 'wrap', text: line.description ?? '' }),
      h('td', { class: 'num', text: line.quantity == null ? '—' : formatCount(line.quantity) }),
      h('td', { class: 'num', text: line.unit_price_usd == null ? '—' : formatUSD(line.unit_price_usd) }),
      h('td', { class: 'num', text: formatUSD(num(line.amount_usd)), title: exactUSD(line.amount_usd) }),
    )), 4, `No billable usage for ${inv.key_name ?? 'this key'} in ${inv.period ?? 'this period'}.`);
    setText('invoice-total', `Total ${formatUSD(num(inv.total_usd))}  (plan ${inv.plan ?? 'list'}, ${inv.plan_kind ?? 'unknown'})`);
  }

  function onInvoicePreview() {
    const { id, period, valid } = invoiceSelection();
    if (!id) {
      setText('invoices-error', 'Choose a key first.');
      $('invoice-key').focus();
      return;
    }
    if (!valid) {
      setText('invoices-error', 'Enter the month as YYYY-MM.');
      $('invoice-month').focus();
      return;
    }
    setText('invoices-error', '');
    state.invoice.shown = { id, period };
    clearInvoice();
    refresh();
  }

  // ---------------------------------------------------------------------------------------
  // Wiring

  function debounce(fn, ms) {
    let t = null;
    return (...args) => {
      clearTimeout(t);
      t = setTimeout(() => fn(...args), ms);
    };
  }

  function init() {
    $('signin').addEventListener('submit', onSignin);
    $('signout').addEventListener('click', signOut);
    window.addEventListener('hashchange', () => {
      if (state.csrf) applyRoute();
    });

    $('key-search').addEventListener('input', (e) => {
      state.keys.search = e.target.value;
      renderKeys();
    });
    $('keys-table').tHead.addEventListener('click', onSortClick);
    $('keys-body').addEventListener('click', onKeysTableClick);
    $('new-key').addEventListener('click', () => openKeyDialog(null));
    $('key-form').addEventListener('submit', onKeySubmit);
    $('key-cancel').addEventListener('click', () => $('key-dialog').close());
    $('key-dialog').addEventListener('close', onKeyDialogClose);

    $('copy-secret').addEventListener('click', onCopySecret);
    $('secret-done').addEventListener('click', () => {
      // Empty first: the close event is dispatched asynchronously.
      onSecretClose();
      $('secret-dialog').close();
    });
    $('secret-dialog').addEventListener('close', onSecretClose);

    $('confirm-yes').addEventListener('click', onConfirmRevoke);
    $('confirm-no').addEventListener('click', () => $('confirm-dialog').close());
    $('confirm-dialog').addEventListener('close', () => {
      state.keys.revoking = null;
      setText('confirm-error', '');
    });

    $('spend-range').addEventListener('change', refresh);
    $('burn-key').addEventListener('change', (e) => {
      state.spend.burnKeyId = e.target.value;
      refresh();
    });
    $('routing-range').addEventListener('change', refresh);
    $('routing-metric').addEventListener('change', renderRouting);

    $('invoice-month').value = currentUtcMonth();
    $('invoice-key').addEventListener('change', updateCsvLink);
    $('invoice-month').addEventListener('input', updateCsvLink);
    $('invoice-show').addEventListener('click', onInvoicePreview);
    updateCsvLink();

    window.addEventListener('resize', debounce(redrawCharts, 200));

    checkSession();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
}());
