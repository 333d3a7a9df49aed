// actrix diagnostics page: the ICE server URLs of this node, ICE gathering against its STUN
// and TURN over the transport the user chose (UDP, TCP or TLS), a relayed data-channel echo
// between two in-page peer connections, and live figures from /metrics.
// Plain browser JavaScript, no dependencies. Results are also written as JSON into
// <pre id="result" data-done="1"> (what the end-to-end test reads).
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const cfg = JSON.parse($('diag-config').textContent);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // Parameters from the fragment (preferred: never sent to the server) and the query.
  const hashParams = new URLSearchParams(location.hash.replace(/^#/, ''));
  const queryParams = new URLSearchParams(location.search);
  const param = (k) => (hashParams.has(k) ? hashParams.get(k) : queryParams.get(k));

  // Listeners on a wildcard address come with a placeholder host: use the page's host.
  const pageHost = location.hostname.includes(':') ? `[${location.hostname}]` : location.hostname;
  const expand = (u) => u.split(cfg.host_placeholder).join(pageHost);
  const stunUrls = cfg.stun_urls.map(expand);
  // TURN URLs by transport; a transport this node does not serve has none.
  const TRANSPORTS = ['udp', 'tcp', 'tls'];
  const turnUrls = {};
  for (const t of TRANSPORTS) turnUrls[t] = (cfg.turn[t] || []).map(expand);
  const served = TRANSPORTS.filter((t) => turnUrls[t].length > 0);

  const result = {
    version: 1,
    done: false,
    ok: false,
    started_at: new Date().toISOString(),
    stun_urls: stunUrls,
    turn_urls: turnUrls,
    transport: null,
    ice_servers: [],
    credential: 'none',
    gather: {},
    echo: null,
    metrics: null,
    errors: [],
  };

  function publish() {
    const pre = $('result');
    pre.textContent = JSON.stringify(result, null, 2);
    pre.dataset.done = result.done ? '1' : '0';
  }

  function setStatus(text, cls) {
    const s = $('status');
    s.textContent = text;
    s.className = `status ${cls}`;
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  // ------------------------------------------------------------------ candidates

  // "candidate:1 1 udp 2122260223 10.0.0.2 54321 typ host ..." -> fields (fallback when the
  // browser does not fill RTCIceCandidate's attributes).
  function parseCandidate(line) {
    const f = line.replace(/^a=/, '').split(' ');
    const out = { protocol: (f[2] || '').toLowerCase(), address: f[4], port: Number(f[5]), type: f[7] };
    for (let i = 8; i + 1 < f.length; i += 2) {
      if (f[i] === 'raddr') out.relatedAddress = f[i + 1];
      if (f[i] === 'rport') out.relatedPort = Number(f[i + 1]);
    }
    return out;
  }

  function describe(c, url, ms) {
    const p = parseCandidate(c.candidate);
    return {
      type: c.type || p.type,
      address: c.address || p.address,
      port: c.port || p.port,
      protocol: (c.protocol || p.protocol || '').toLowerCase(),
      relay_protocol: c.relayProtocol || null,
      related_address: c.relatedAddress || p.relatedAddress || null,
      url: url || c.url || null,
      ms: Math.round(ms),
    };
  }

  const seenTypes = new Set();

  function addCandidateRow(policy, d) {
    const body = $('cands');
    const empty = body.querySelector('tr.empty');
    if (empty) empty.remove();
    body.append(
      el(
        'tr',
        {},
        el('td', {}, policy),
        el('td', { class: `t-${d.type}` }, d.type),
        el('td', { class: 'mono addr' }, d.address || '?'),
        el('td', { class: 'mono' }, String(d.port)),
        el('td', {}, d.relay_protocol ? `${d.protocol} (relay over ${d.relay_protocol})` : d.protocol),
        el('td', { title: d.url || '' }, d.url ? d.url.split(':')[0] : ''),
        el('td', {}, `${d.ms} ms`),
      ),
    );
    seenTypes.add(d.type);
    for (const t of ['host', 'srflx', 'relay']) {
      $(`badge-${t}`).classList.toggle('ok', seenTypes.has(t));
    }
  }

  // Gather with one policy; resolves when gathering completes or after timeoutMs.
  async function gather(policy, iceServers, timeoutMs) {
    const pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: policy });
    const out = { policy, candidates: [], errors: [], complete: false, ms: 0 };
    const t0 = performance.now();
    const finished = new Promise((resolve) => {
      pc.onicecandidate = (e) => {
        if (!e.candidate) return resolve();
        if (!e.candidate.candidate) return undefined;
        const d = describe(e.candidate, e.url, performance.now() - t0);
        out.candidates.push(d);
        addCandidateRow(policy, d);
        return undefined;
      };
      pc.onicegatheringstatechange = () => {
        if (pc.iceGatheringState === 'complete') resolve();
      };
    });
    pc.onicecandidateerror = (e) => {
      const err = { url: e.url, code: e.errorCode, text: e.errorText };
      out.errors.push(err);
      $('ice-errors').append(el('li', {}, `${policy}: ${e.url || ''} ${e.errorCode} ${e.errorText || ''}`));
    };
    pc.createDataChannel('probe');
    await pc.setLocalDescription(await pc.createOffer());
    out.complete = await Promise.race([finished.then(() => true), sleep(timeoutMs).then(() => false)]);
    out.ms = Math.round(performance.now() - t0);
    // Browsers that do not put relayProtocol on the candidate object report it in getStats.
    try {
      const stats = await pc.getStats();
      const proto = new Map();
      stats.forEach((x) => {
        if (x.type === 'local-candidate' && x.relayProtocol) proto.set(`${x.address || x.ip}:${x.port}`, x.relayProtocol);
      });
      for (const c of out.candidates) {
        if (c.type === 'relay' && !c.relay_protocol) c.relay_protocol = proto.get(`${c.address}:${c.port}`) || null;
      }
    } catch (e) {
      out.errors.push({ url: null, code: null, text: `getStats: ${e.message}` });
    }
    pc.close();
    return out;
  }

  // ------------------------------------------------------------------ relayed echo

  const median = (xs) => {
    const s = [...xs].sort((a, b) => a - b);
    const m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
  };

  // Two relay-only peer connections, signalled inside the page; `pings` echoes through them.
  async function echo(iceServers, pings) {
    const conf = { iceServers, iceTransportPolicy: 'relay' };
    const a = new RTCPeerConnection(conf);
    const b = new RTCPeerConnection(conf);
    const out = { pings, rtts_ms: [], lost: 0, median_ms: null, min_ms: null, max_ms: null, path: null, connect_ms: null };
    // Trickle candidates across; queue them until the remote description is set.
    const wire = (from, to) => {
      const queue = [];
      let ready = false;
      from.onicecandidate = (e) => {
        if (!e.candidate) return;
        if (ready) to.addIceCandidate(e.candidate).catch(() => {});
        else queue.push(e.candidate);
      };
      return () => {
        ready = true;
        for (const c of queue.splice(0)) to.addIceCandidate(c).catch(() => {});
      };
    };
    const flushToB = wire(a, b);
    const flushToA = wire(b, a);
    b.ondatachannel = (e) => {
      const ch = e.channel;
      ch.onmessage = (m) => ch.send(m.data);
    };
    const dc = a.createDataChannel('echo', { ordered: false, maxRetransmits: 0 });
    const t0 = performance.now();
    const opened = new Promise((resolve, reject) => {
      dc.onopen = resolve;
      dc.onclose = () => reject(new Error('data channel closed'));
    });
    try {
      await a.setLocalDescription(await a.createOffer());
      await b.setRemoteDescription(a.localDescription);
      flushToB();
      await b.setLocalDescription(await b.createAnswer());
      await a.setRemoteDescription(b.localDescription);
      flushToA();
      const ok = await Promise.race([opened.then(() => true), sleep(20000).then(() => false)]);
      if (!ok) throw new Error(`relayed connection not established in 20 s (ICE state ${a.iceConnectionState})`);
      out.connect_ms = Math.round(performance.now() - t0);

      const waiting = new Map();
      dc.onmessage = (m) => {
        const w = waiting.get(m.data);
        if (w) w(performance.now());
      };
      for (let i = 0; i < pings; i++) {
        const msg = `ping ${i} ${Date.now()}`;
        const got = new Promise((resolve) => waiting.set(msg, resolve));
        const sent = performance.now();
        dc.send(msg);
        const at = await Promise.race([got, sleep(2000).then(() => null)]);
        waiting.delete(msg);
        if (at === null) {
          out.lost += 1;
          addBar(null);
        } else {
          const rtt = Math.round((at - sent) * 1000) / 1000;
          out.rtts_ms.push(rtt);
          addBar(rtt);
        }
        showEcho(out);
        await sleep(50);
      }
      out.path = await selectedPath(a);
    } finally {
      a.close();
      b.close();
    }
    if (out.rtts_ms.length) {
      out.median_ms = median(out.rtts_ms);
      out.min_ms = Math.min(...out.rtts_ms);
      out.max_ms = Math.max(...out.rtts_ms);
    }
    showEcho(out);
    return out;
  }

  async function selectedPath(pc) {
    const stats = await pc.getStats();
    let pair = null;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
    });
    if (!pair) {
      stats.forEach((s) => {
        if (s.type === 'candidate-pair' && s.state === 'succeeded' && (s.nominated || s.selected)) pair = s;
      });
    }
    if (!pair) return null;
    const side = (id) => {
      const c = stats.get(id);
      return c ? { type: c.candidateType, address: c.address || c.ip, port: c.port, relay_protocol: c.relayProtocol || null } : null;
    };
    return {
      local: side(pair.localCandidateId),
      remote: side(pair.remoteCandidateId),
      current_rtt_ms: pair.currentRoundTripTime != null ? pair.currentRoundTripTime * 1000 : null,
    };
  }

  let barMax = 1;
  function addBar(rtt) {
    const bars = $('rtt-bars');
    const d = el('div', { title: rtt === null ? 'lost' : `${rtt} ms` });
    d.dataset.rtt = rtt === null ? '' : String(rtt);
    if (rtt === null) d.className = 'lost';
    bars.append(d);
    barMax = Math.max(barMax, rtt || 0);
    for (const b of bars.children) {
      const v = b.dataset.rtt === '' ? barMax : Number(b.dataset.rtt);
      b.style.height = `${Math.max(3, (v / barMax) * 100)}%`;
    }
  }

  const fmt = (v) => (v == null ? '-' : v < 10 ? v.toFixed(2) : v.toFixed(1));

  function showEcho(o) {
    const r = o.rtts_ms;
    $('rtt-median').textContent = r.length ? fmt(median(r)) : '-';
    $('rtt-min').textContent = r.length ? fmt(Math.min(...r)) : '-';
    $('rtt-max').textContent = r.length ? fmt(Math.max(...r)) : '-';
    $('rtt-count').textContent = `${r.length} / ${o.lost}`;
    if (o.path && o.path.local) {
      const s = (c) => (c ? `${c.type} ${c.address}:${c.port}` : '?');
      $('echo-path').textContent = `selected pair: ${s(o.path.local)} \u2194 ${s(o.path.remote)}; connected in ${o.connect_ms} ms`;
    }
  }

  // ------------------------------------------------------------------ /metrics

  // Prometheus text format -> { name: { sum, series: [{labels, value}] } }.
  function parseMetrics(text) {
    const out = {};
    const re = /^([A-Za-z_:][A-Za-z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/;
    for (const line of text.split('\n')) {
      if (!line || line[0] === '#') continue;
      const m = re.exec(line);
      if (!m) continue;
      const value = Number(m[4]);
      if (!Number.isFinite(value)) continue;
      const labels = {};
      if (m[3]) {
        for (const l of m[3].matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
      }
      const e = (out[m[1]] = out[m[1]] || { sum: 0, series: [] });
      e.sum += value;
      e.series.push({ labels, value });
    }
    return out;
  }

  // Counters are exposed with a _total suffix; accept both spellings.
  const series = (all, name) => all[`${name}_total`] || all[name] || null;
  const total = (all, name) => (series(all, name) ? series(all, name).sum : null);
  const byLabel = (all, name, label) => {
    const out = {};
    const s = series(all, name);
    if (s) for (const x of s.series) out[x.labels[label] || ''] = (out[x.labels[label] || ''] || 0) + x.value;
    return out;
  };

  // The tiles: only aggregate numbers and bounded labels (direction, drop reason).
  const TILES = [
    ['allocations_active', 'allocations active', (m) => total(m, 'actrix_allocations_active'), false],
    ['allocations_created', 'allocations created', (m) => total(m, 'actrix_allocations_created'), true],
    ['relayed_packets', 'relayed packets', (m) => total(m, 'actrix_relayed_packets'), true],
    ['drops', 'drops', (m) => total(m, 'actrix_drops'), true],
    ['auth_failures', 'auth failures', (m) => total(m, 'actrix_auth_failures'), true],
    ['auth_challenges', 'auth challenges', (m) => total(m, 'actrix_auth_challenges'), true],
    ['binding_requests', 'binding requests', (m) => total(m, 'actrix_binding_requests'), true],
    ['peers_denied', 'peers denied', (m) => total(m, 'actrix_peers_denied'), true],
    ['stream_connections', 'TCP/TLS connections', (m) => total(m, 'actrix_stream_connections'), false],
    ['rss_mib', 'memory (MiB)', (m) => {
      const v = total(m, 'process_resident_memory_bytes');
      return v == null ? null : Math.round(v / 1048576);
    }, false],
  ];

  const tileEls = {};
  function buildTiles() {
    const box = $('metric-tiles');
    for (const [key, label] of TILES) {
      const num = el('span', { class: 'num' }, '-');
      const rate = el('span', { class: 'rate' }, '\u00a0');
      box.append(el('div', { class: 'fig', id: `m-${key}` }, num, el('span', { class: 'lbl' }, label), rate));
      tileEls[key] = { num, rate };
    }
  }

  let last = null;
  async function pollMetrics() {
    try {
      const r = await fetch('/metrics', { cache: 'no-store' });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const all = parseMetrics(await r.text());
      const now = performance.now();
      const snap = {};
      for (const [key, , get, isCounter] of TILES) {
        const v = get(all);
        snap[key] = v;
        tileEls[key].num.textContent = v == null ? 'n/a' : v.toLocaleString('en-US');
        if (isCounter && last && v != null && last.values[key] != null) {
          const per = ((v - last.values[key]) * 1000) / (now - last.at);
          tileEls[key].rate.textContent = `${per.toFixed(per < 10 ? 1 : 0)}/s`;
        }
      }
      const relayed = byLabel(all, 'actrix_relayed_packets', 'direction');
      snap.relayed_by_direction = relayed;
      const drops = byLabel(all, 'actrix_drops', 'reason');
      snap.drops_by_reason = drops;
      snap.stream_accepted_by_transport = byLabel(all, 'actrix_stream_accepted', 'transport');
      const top = Object.entries(drops).filter(([, v]) => v > 0).sort((x, y) => y[1] - x[1]).slice(0, 5);
      $('drop-reasons').textContent =
        `relayed: ${Object.entries(relayed).map(([k, v]) => `${k} ${v}`).join(', ') || '-'}` +
        (top.length ? `; drops: ${top.map(([k, v]) => `${k} ${v}`).join(', ')}` : '');
      last = { at: now, values: snap };
      result.metrics = snap;
      $('metrics-age').textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      $('metrics-age').textContent = `/metrics unavailable: ${e.message}`;
      result.metrics = { error: String(e.message) };
    }
  }

  // ------------------------------------------------------------------ the run

  async function mintedCredential() {
    const r = await fetch('/diag/credential', { cache: 'no-store' });
    if (!r.ok) throw new Error(`/diag/credential: HTTP ${r.status}`);
    return r.json();
  }

  let running = false;
  async function run(useMinted) {
    if (running) return;
    running = true;
    $('run').disabled = true;
    $('mint').disabled = true;
    setStatus('running', 'running');
    result.done = false;
    result.errors = [];
    result.gather = {};
    result.echo = null;
    $('cands').replaceChildren(el('tr', { class: 'empty' }, el('td', { colspan: '7' }, 'gathering...')));
    $('ice-errors').replaceChildren();
    $('run-errors').replaceChildren();
    $('rtt-bars').replaceChildren();
    barMax = 1;
    seenTypes.clear();
    for (const t of ['host', 'srflx', 'relay']) $(`badge-${t}`).className = 'badge';
    publish();
    try {
      if (typeof RTCPeerConnection !== 'function') throw new Error('this browser has no WebRTC (RTCPeerConnection)');
      let user = $('user').value;
      let pass = $('pass').value;
      result.credential = user ? 'typed' : 'none';
      if (useMinted) {
        const c = await mintedCredential();
        user = c.username;
        pass = c.password;
        $('user').value = user;
        $('pass').value = pass;
        result.credential = 'minted';
      }
      const pings = Math.max(1, Math.min(500, Number($('pings').value) || 20));
      const transport = $('transport').value;
      result.transport = transport;
      const urls = turnUrls[transport] || [];
      if (served.length && !urls.length) throw new Error(`this node serves no TURN over ${transport.toUpperCase()}`);
      const stun = stunUrls.length ? [{ urls: stunUrls }] : [];
      const turn = user && urls.length ? [{ urls, username: user, credential: pass }] : [];
      result.ice_servers = [...stun, ...turn].map((s) => ({ urls: s.urls }));

      result.gather.all = await gather('all', [...stun, ...turn], 10000);
      if (turn.length) {
        result.gather.relay = await gather('relay', turn, 10000);
        if (result.gather.relay.candidates.some((c) => c.type === 'relay')) {
          result.echo = await echo(turn, pings);
        } else {
          result.errors.push('no relay candidate (see the ICE errors): the echo test was skipped');
        }
      } else {
        result.errors.push(
          served.length
            ? 'no TURN credential: relay gathering and the echo test were skipped'
            : 'this node serves no TURN: relay gathering and the echo test were skipped',
        );
      }
      for (const t of ['srflx', 'relay']) {
        if (!seenTypes.has(t) && (t === 'srflx' || turn.length)) $(`badge-${t}`).classList.add('bad');
      }
      const all = [...result.gather.all.candidates, ...(result.gather.relay ? result.gather.relay.candidates : [])];
      // STUN is UDP: a reflexive address is required when testing UDP (or STUN alone); over
      // TCP and TLS, what counts is the relay (networks that block UDP are why they exist).
      result.ok =
        (transport !== 'udp' || !turn.length || all.some((c) => c.type === 'srflx')) &&
        (!turn.length || (all.some((c) => c.type === 'relay') && !!result.echo && result.echo.rtts_ms.length > 0));
    } catch (e) {
      result.errors.push(String(e && e.message ? e.message : e));
      result.ok = false;
      const pending = $('cands').querySelector('tr.empty td');
      if (pending) pending.textContent = 'not run (see the errors above)';
    }
    $('run-errors').replaceChildren(...result.errors.map((e) => el('li', {}, e)));
    await pollMetrics();
    result.done = true;
    result.finished_at = new Date().toISOString();
    setStatus(result.ok ? 'ok' : 'problems found', result.ok ? 'ok' : 'bad');
    publish();
    running = false;
    $('run').disabled = false;
    $('mint').disabled = false;
  }

  // ------------------------------------------------------------------ the URLs for applications

  const TRANSPORT_LABEL = { udp: 'UDP', tcp: 'TCP', tls: 'TLS' };

  // Whether the TLS certificate is valid for `host` (a DNS name, maybe matched by a wildcard
  // of one label, or an address).
  function certCovers(host) {
    const h = host.replace(/^\[|\]$/g, '').toLowerCase();
    if ((cfg.tls_ips || []).includes(h)) return true;
    return (cfg.tls_names || []).some((n) => {
      const name = n.toLowerCase();
      if (name === h) return true;
      if (!name.startsWith('*.') || !h.endsWith(name.slice(1))) return false;
      const label = h.slice(0, h.length - name.length + 1);
      return label.length > 0 && !label.includes('.');
    });
  }
  const urlHost = (u) => u.replace(/^turns?:/, '').replace(/\?.*$/, '').replace(/:\d+$/, '');

  function tlsNote(u) {
    const notes = [];
    const names = (cfg.tls_names || []).concat(cfg.tls_ips || []);
    if (!certCovers(urlHost(u))) {
      notes.push(`the certificate is not valid for this host (it names ${names.join(', ') || 'nothing'}): use a URL with a name it covers`);
    } else if (names.length) {
      notes.push(`certificate for ${names.join(', ')}`);
    }
    if (cfg.tls_self_signed) notes.push('self-signed: browsers refuse it unless told to trust it (for trying only)');
    return { text: notes.join('; '), warn: cfg.tls_self_signed || !certCovers(urlHost(u)) };
  }

  // The transports this node serves and the addresses it listens on for each.
  function showListeners() {
    const listen = cfg.listen || {};
    const rows = TRANSPORTS.map((t) => {
      const addrs = listen[t] || [];
      return el('tr', {}, el('td', {}, TRANSPORT_LABEL[t]),
        el('td', { class: addrs.length ? 'url' : 'note' }, addrs.length ? addrs.join('  ') : 'not served'));
    });
    $('listeners').replaceChildren(...rows);
  }

  function showAppServers() {
    const body = $('app-urls');
    const rows = [];
    for (const t of served) {
      for (const u of turnUrls[t]) {
        const note = t === 'tls' ? tlsNote(u) : { text: t === 'udp' ? 'the default; fastest' : 'where UDP is blocked', warn: false };
        rows.push(el('tr', {}, el('td', {}, TRANSPORT_LABEL[t]), el('td', { class: 'url' }, u), el('td', { class: note.warn ? 'note warn' : 'note' }, note.text)));
      }
    }
    if (rows.length) body.replaceChildren(...rows);
    const all = served.flatMap((t) => turnUrls[t]);
    const user = $('user').value || '<username>';
    const lines = ['const pc = new RTCPeerConnection({', '  iceServers: ['];
    for (const u of stunUrls) lines.push(`    { urls: ${JSON.stringify(u)} },`);
    if (all.length) {
      lines.push('    {', '      urls: [');
      for (const u of all) lines.push(`        ${JSON.stringify(u)},`);
      lines.push('      ],', `      username: ${JSON.stringify(user)},`, '      credential: "<password>",', '    },');
    }
    lines.push('  ],', '});');
    $('ice-snippet').textContent = lines.join('\n');
  }

  function showChosen() {
    const t = $('transport').value;
    $('turn-urls').textContent = (turnUrls[t] || []).join('  ') || '(none)';
  }

  // ------------------------------------------------------------------ wiring

  $('stun-urls').textContent = stunUrls.join('  ') || '(none)';
  for (const opt of $('transport').options) {
    if (!turnUrls[opt.value].length) {
      opt.disabled = true;
      opt.textContent += ' (not served here)';
    }
  }
  {
    const want = (param('transport') || '').toLowerCase();
    // A transport asked for in the URL stays selected even when this node does not serve it,
    // so the run reports that; without one (or an unknown one), the first served is chosen.
    if (TRANSPORTS.includes(want)) $('transport').value = want;
    else if (served.length) $('transport').value = served[0];
  }
  $('transport').addEventListener('change', showChosen);
  $('user').addEventListener('input', showAppServers);
  if (cfg.credential) {
    $('mint').hidden = false;
    $('cred-hint').textContent = 'Type a TURN credential, or let this node mint a short-lived one for the page.';
  }
  if (param('user')) $('user').value = param('user');
  if (param('pass')) $('pass').value = param('pass');
  if (param('pings')) $('pings').value = param('pings');
  showChosen();
  showListeners();
  showAppServers();
  $('form').addEventListener('submit', (e) => {
    e.preventDefault();
    run(false);
  });
  $('mint').addEventListener('click', () => run(true));
  buildTiles();
  publish();
  pollMetrics();
  setInterval(pollMetrics, 2000);
  if (param('auto') === '1') run(param('mint') === '1' && cfg.credential);
})();
