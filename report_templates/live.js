// The live page of `servescope run --live`: polls /api/state?since=V and redraws what changed.
// Everything shown comes from the run's own data; the page keeps the windows and points it was
// sent, so each poll carries only the news since its last version.
(function () {
  'use strict';
  var token = document.body.getAttribute('data-token') || '';
  var withToken = function (path, sep) { return token ? path + (sep || '?') + 'token=' + encodeURIComponent(token) : path; };
  var POLL_MS = 500, FINISHED_POLL_MS = 2000;
  var state = {
    version: 0, windows: new Map(), server: new Map(), progress: [], findings: [], current: null,
    status: 'connecting', delays: [], draws: [], polls: 0, drawn: 0, lastDataAt: null, windowS: 1,
  };
  window.servescopeLive = state;  // what the browser test and the benchmark read

  var config = {responsive: true, displaylogo: false};
  var baseLayout = function (title, yTitle, extra) {
    var layout = {
      title: {text: title, font: {size: 14}}, height: 320, margin: {l: 60, r: 60, t: 40, b: 50},
      xaxis: {title: {text: 'time in run (s)'}}, yaxis: {title: {text: yTitle}, rangemode: 'tozero'},
      legend: {orientation: 'h', y: -0.38}, paper_bgcolor: '#ffffff', plot_bgcolor: '#ffffff',
      font: {family: 'system-ui, sans-serif', size: 12, color: '#1f2933'}, uirevision: 'keep',
    };
    Object.keys(extra || {}).forEach(function (k) { layout[k] = extra[k]; });
    return layout;
  };
  var y2 = function (title) { return {title: {text: title}, overlaying: 'y', side: 'right', rangemode: 'tozero', showgrid: false}; };
  var line = function (x, y, name, extra) {
    var t = {type: 'scatter', mode: 'lines', name: name, x: x, y: y};
    Object.keys(extra || {}).forEach(function (k) { t[k] = extra[k]; });
    return t;
  };
  var ms = function (v) { return v === null || v === undefined ? null : v * 1e3; };
  var draw = function (id, traces, layout) {
    var node = document.getElementById(id);
    if (!traces.length) { node.hidden = true; return; }
    node.hidden = false;
    Plotly.react(node, traces, layout, config);
  };

  // -- charts ---------------------------------------------------------------------------------
  var drawClient = function () {
    var keys = Array.from(state.windows.keys()).sort(function (a, b) { return a - b; });
    var w = keys.map(function (k) { return state.windows.get(k); });
    var x = w.map(function (s) { return s.t0 + state.windowS; });
    var col = function (name, f) { return w.map(function (s) { return (f || function (v) { return v; })(s[name]); }); };
    draw('chart-latency', [
      line(x, col('ttft_p50', ms), 'TTFT p50'), line(x, col('ttft_p99', ms), 'TTFT p99'),
      line(x, col('itl_p50', ms), 'ITL p50', {visible: 'legendonly'}), line(x, col('itl_p99', ms), 'ITL p99'),
      line(x, col('e2e_p50', ms), 'E2E p50', {visible: 'legendonly'}), line(x, col('e2e_p99', ms), 'E2E p99'),
    ], baseLayout('Latency per window (by completion)', 'ms'));
    draw('chart-throughput', [
      line(x, col('req_per_s'), 'completed req/s'), line(x, col('tok_per_s'), 'output tok/s', {yaxis: 'y2'}),
    ], baseLayout('Throughput', 'req/s', {yaxis2: y2('tok/s')}));
    var kinds = {};
    w.forEach(function (s) { Object.keys(s.errors || {}).forEach(function (k) { kinds[k] = true; }); });
    draw('chart-errors', Object.keys(kinds).map(function (k) {
      return {type: 'bar', name: k, x: x, y: w.map(function (s) { return (s.errors || {})[k] || 0; })};
    }), baseLayout('Errors by kind', 'failed requests', {barmode: 'stack'}));
    draw('chart-lag', [line(x, col('lag_p99', ms), 'schedule lag p99')],
      baseLayout("Load generator's own lag (sent minus scheduled)", 'ms'));
    var traces = [];
    if (state.progress.length) {
      traces.push(line(state.progress.map(function (p) { return p.t; }),
        state.progress.map(function (p) { return p.outstanding; }), 'sessions handed out, not done (client)'));
    }
    serverSeries('running').forEach(function (s) { traces.push(line(s.x, s.y, 'running' + s.label)); });
    serverSeries('waiting').forEach(function (s) { traces.push(line(s.x, s.y, 'waiting (queue)' + s.label)); });
    draw('chart-inflight', traces, baseLayout('Requests in flight and the server queue', 'requests'));
  };

  var serverSeries = function (key, scale) {
    var out = [], many = state.server.size > 1;
    state.server.forEach(function (points, source) {
      var have = points.filter(function (p) { return p[key] !== undefined && p[key] !== null; });
      if (!have.length) { return; }
      out.push({x: have.map(function (p) { return p.t; }), y: have.map(function (p) { return p[key] * (scale || 1); }),
                label: many ? ' (' + source + ')' : ''});
    });
    return out;
  };

  var drawServer = function () {
    var kv = [];
    serverSeries('kv_usage', 100).forEach(function (s) { kv.push(line(s.x, s.y, 'KV usage %' + s.label)); });
    serverSeries('prefix_hit_rate', 100).forEach(function (s) { kv.push(line(s.x, s.y, 'prefix-cache hit rate %' + s.label)); });
    serverSeries('preemptions_per_s').forEach(function (s) { kv.push(line(s.x, s.y, 'preemptions/s' + s.label, {yaxis: 'y2'})); });
    draw('chart-kv', kv, baseLayout('KV cache, prefix cache and preemptions', '%', {yaxis2: y2('preemptions/s')}));
    var gpu = [];
    serverSeries('gpu_util').forEach(function (s) { gpu.push(line(s.x, s.y, 'GPU utilisation %' + s.label)); });
    serverSeries('host_cpu_busy').forEach(function (s) { gpu.push(line(s.x, s.y, 'host CPU busy %' + s.label)); });
    serverSeries('gpu_mem_used', 1 / 1073741824).forEach(function (s) { gpu.push(line(s.x, s.y, 'GPU memory GiB' + s.label, {yaxis: 'y2'})); });
    serverSeries('gpu_power').forEach(function (s) { gpu.push(line(s.x, s.y, 'GPU power W' + s.label, {yaxis: 'y2'})); });
    draw('chart-gpu', gpu, baseLayout('GPU utilisation, memory and power', '%', {yaxis2: y2('GiB / W')}));
    var note = document.getElementById('no-server');
    note.hidden = (kv.length + gpu.length) > 0;
    note.textContent = state.server.size ? 'The scraped endpoints report no KV cache, preemption or GPU series (queue and running are under Client side).'
      : 'No metrics endpoint has answered yet.';
  };

  // -- findings, header -------------------------------------------------------------------------
  var el = function (tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }  // text only: server strings never become markup
    return node;
  };
  var drawFindings = function () {
    var list = document.getElementById('finding-list');
    list.replaceChildren();
    if (!state.findings.length) { list.appendChild(el('p', 'muted', 'None has fired.')); return; }
    state.findings.forEach(function (f) {
      var card = el('div', 'finding ' + f.severity);
      card.setAttribute('data-rule', f.rule);
      var h = el('h3');
      h.appendChild(el('span', 'badge ' + f.severity, f.severity));
      if (f.confidence !== null && f.confidence !== undefined) {
        h.appendChild(el('span', 'muted confidence', ' confidence ' + f.confidence_level + ' (' + f.confidence.toFixed(2) + ') '));
      }
      h.appendChild(document.createTextNode(' ' + f.title + ' '));
      h.appendChild(el('span', 'muted', '· ' + f.rule));
      if (f.uncertain) { h.appendChild(el('span', 'lown', ' less certain')); }
      card.appendChild(h);
      card.appendChild(el('p', '', f.summary));
      if (f.suggestion) {
        var p = el('p', 'suggestion');
        p.appendChild(el('b', '', 'What to do: '));
        p.appendChild(document.createTextNode(f.suggestion));
        card.appendChild(p);
      }
      var details = el('details');
      details.appendChild(el('summary', '', 'Evidence (at ' + f.t.toFixed(1) + ' s)'));
      details.appendChild(el('pre', '', JSON.stringify(f.evidence, null, 1)));
      if (f.slices && f.slices.length) { details.appendChild(el('pre', '', JSON.stringify(f.slices))); }
      card.appendChild(details);
      list.appendChild(card);
    });
  };

  var seconds = function (v) {
    if (v === null || v === undefined) { return '–'; }
    return v >= 60 ? Math.floor(v / 60) + ' min ' + Math.round(v % 60) + ' s' : v.toFixed(0) + ' s';
  };
  var drawHeader = function (s) {
    var status = s.status === 'finished' ? (s.outcome.status || 'finished') : (s.stop_requested && s.status === 'running' ? 'stopping' : s.status);
    document.getElementById('status').textContent = status;
    var c = s.current;
    if (c) {
      document.getElementById('phase').textContent = (c.phase || 'prewarming') + ' (' + (c.phase_index + 1) + '/' + c.phase_count + ')';
      document.getElementById('time-left').textContent = s.status === 'finished' ? '0 s' : seconds(c.time_left_s);
    }
    document.getElementById('records').textContent = s.records.toLocaleString();
    var stop = document.getElementById('stop');
    stop.disabled = s.status !== 'running' || s.stop_requested;
    if (s.status === 'finished') {
      stop.hidden = true;
      if (s.outcome.report) {
        document.getElementById('report').hidden = false;
        document.getElementById('report-link').href = s.outcome.report;
      }
    }
    var recent = state.delays.slice(-20);
    if (recent.length) {
      document.getElementById('behind').textContent = (Math.max.apply(null, recent) * 1e3).toFixed(0) + ' ms';
    }
  };

  // -- polling ----------------------------------------------------------------------------------
  var merge = function (s) {
    state.windowS = s.window_s;
    s.windows.forEach(function (w) { state.windows.set(w.t0, w); });
    s.server.forEach(function (p) {
      if (!state.server.has(p.source)) { state.server.set(p.source, []); }
      state.server.get(p.source).push(p);
    });
    s.progress.forEach(function (p) { state.progress.push(p); });
    state.findings = s.findings;
    state.current = s.current;
    state.status = s.status;
  };

  var poll = function () {
    var started = performance.now();
    fetch(withToken('/api/state?since=' + state.version, '&'), {cache: 'no-store'})
      .then(function (r) { if (!r.ok) { throw new Error('HTTP ' + r.status); } return r.json(); })
      .then(function (s) {
        if (state.runDir !== undefined && s.run_dir !== state.runDir) {
          window.location.reload();  // the next repetition of --repeat: another run on this port
          return;
        }
        state.runDir = s.run_dir;
        // The first read finds data older than the page itself: not a delay of the page.
        var fresh = s.data_at !== null && s.data_at !== state.lastDataAt && state.polls > 0;
        merge(s);
        state.version = s.version;
        // Redraw only what changed: drawing is most of what the page costs the machine it runs on.
        var drawStart = performance.now();
        var findingsText = JSON.stringify(s.findings);
        if (s.windows.length || s.progress.length || s.server.length) { drawClient(); }
        if (s.server.length || !state.polls) { drawServer(); }
        if (findingsText !== state.findingsText) { drawFindings(); state.findingsText = findingsText; }
        drawHeader(s);
        state.draws.push((performance.now() - drawStart) / 1e3);
        state.polls += 1;
        state.drawn = performance.now();
        if (fresh) {
          // How long the newest data waited before this page showed it: its age when served,
          // plus the request and the drawing (the page's own clock).
          state.delays.push((s.now - s.data_at) + (performance.now() - started) / 1e3);
        }
        state.lastDataAt = s.data_at;
        // One poll every POLL_MS from the start of the last, drawing included, so a slow draw
        // does not add a whole interval to how far behind the page is.
        var every = s.status === 'finished' ? FINISHED_POLL_MS : POLL_MS;
        setTimeout(poll, Math.max(50, every - (performance.now() - started)));
      })
      .catch(function () {
        document.getElementById('status').textContent = state.status === 'finished' ? 'finished (page server closed)' : 'disconnected';
        setTimeout(poll, FINISHED_POLL_MS);
      });
  };

  document.getElementById('stop').addEventListener('click', function () {
    var button = document.getElementById('stop');
    button.disabled = true;
    fetch(withToken('/api/stop'), {method: 'POST', headers: {'X-Servescope-Stop': '1'}})
      .then(function (r) { document.getElementById('status').textContent = r.ok ? 'stopping' : 'stop refused (HTTP ' + r.status + ')'; });
  });
  poll();
})();
