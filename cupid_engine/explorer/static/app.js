// cupid_engine explorer: one page, hash routes, data from small script files (works from file://).
"use strict";
(function () {
  const cache = {}, waiting = {};
  window.cupidData = function (key, payload) {
    cache[key] = payload;
    (waiting[key] || []).forEach((w) => w.resolve(payload));
    delete waiting[key];
  };
  function load(key) {
    if (cache[key]) return Promise.resolve(cache[key]);
    return new Promise((resolve, reject) => {
      const first = !waiting[key];
      (waiting[key] = waiting[key] || []).push({ resolve, reject });
      if (!first) return;
      const s = document.createElement("script");
      s.src = "data/" + key + ".js";
      s.onerror = () => { (waiting[key] || []).forEach((w) => w.reject(new Error("missing data file data/" + key + ".js"))); delete waiting[key]; };
      document.head.appendChild(s);
    });
  }

  const PALETTE = ["#2471a3", "#c0392b", "#117a65", "#b9770e", "#7d3c98", "#5d6d7e", "#d35400", "#1abc9c", "#34495e", "#e84393", "#6c5ce7", "#00b894"];
  const SVGNS = "http://www.w3.org/2000/svg";
  const main = () => document.getElementById("main");

  function esc(s) { return String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
  function fmt(x, d) {
    if (x == null) return "–";
    if (typeof x !== "number") return esc(x);
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return x.toExponential(d == null ? 2 : Math.min(d, 2));
    return x.toFixed(a >= 100 ? Math.min(d == null ? 3 : d, 1) : (d == null ? 3 : d));
  }
  function outcome(s) { return s == null ? '<span class="muted">unknown</span>' : (s ? '<span class="ok">success</span>' : '<span class="fail">failure</span>'); }
  function labelText(l) { const k = Object.keys(l || {}); return k.length ? k.map((x) => esc(x) + "=" + esc(l[x])).join(", ") : '<span class="muted">–</span>'; }
  function svg(tag, attrs, parent) { const e = document.createElementNS(SVGNS, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); if (parent) parent.appendChild(e); return e; }

  // A filmstrip frame: shows the sprite frame nearest to `step`.
  function strip(frames, scale, label) {
    const box = document.createElement("div");
    if (!frames) {
      box.className = "noframes"; box.style.width = (96 * scale) + "px"; box.style.height = (96 * scale) + "px";
      box.textContent = label || "no frames (state-only dataset)";
      box.setStep = () => {};
      return box;
    }
    box.className = "strip";
    box.dataset.kind = "frame";
    const w = frames.w * scale, h = frames.h * scale;
    box.style.width = w + "px"; box.style.height = h + "px";
    box.style.backgroundImage = "url(" + frames.src + ")";
    box.style.backgroundSize = (frames.steps.length * w) + "px " + h + "px";
    box.title = "camera " + frames.camera;
    box.setStep = (step) => {
      let best = 0;
      for (let i = 0; i < frames.steps.length; i++) if (Math.abs(frames.steps[i] - step) < Math.abs(frames.steps[best] - step)) best = i;
      box.style.backgroundPosition = (-best * w) + "px 0px";
      box.dataset.frame = String(best);
    };
    box.setStep(0);
    return box;
  }

  // Line chart of one or more series over steps with a movable marker.
  function lineChart(series, opts) {
    const W = opts.width || 640, H = opts.height || 180, P = { l: 52, r: 10, t: 10, b: 24 };
    const root = svg("svg", { width: W, height: H, class: "linechart", role: "img" });
    let n = 0, lo = 0, hi = 0;
    series.forEach((s) => { n = Math.max(n, s.values.length); s.values.forEach((v) => { if (v != null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }); });
    if (hi === lo) hi = lo + 1;
    const x = (i) => P.l + (n > 1 ? i / (n - 1) : 0.5) * (W - P.l - P.r);
    const y = (v) => P.t + (1 - (v - lo) / (hi - lo)) * (H - P.t - P.b);
    svg("line", { x1: P.l, x2: W - P.r, y1: y(0), y2: y(0), stroke: "#bbb" }, root);
    svg("text", { x: 4, y: P.t + 10 }, root).textContent = fmt(hi, 2);
    svg("text", { x: 4, y: H - P.b }, root).textContent = fmt(lo, 2);
    svg("text", { x: W - P.r - 60, y: H - 6 }, root).textContent = "step (0–" + (n - 1) + ")";
    series.forEach((s) => {
      const pts = s.values.map((v, i) => v == null ? null : x(i).toFixed(1) + "," + y(v).toFixed(1)).filter((p) => p).join(" ");
      svg("polyline", { points: pts, fill: "none", stroke: s.color, "stroke-width": s.width || 1.5, class: "series" }, root);
    });
    const marker = svg("line", { y1: P.t, y2: H - P.b, stroke: "#333", "stroke-dasharray": "3,3", class: "marker" }, root);
    root.setStep = (i) => { marker.setAttribute("x1", x(i)); marker.setAttribute("x2", x(i)); };
    root.setStep(0);
    if (opts.onPick) root.addEventListener("click", (ev) => {
      const r = root.getBoundingClientRect();
      const i = Math.round(((ev.clientX - r.left - P.l) / (W - P.l - P.r)) * (n - 1));
      opts.onPick(Math.max(0, Math.min(n - 1, i)));
    });
    return root;
  }

  function histChart(h, values, colors) {
    const W = 300, H = 150, P = { l: 30, r: 6, t: 6, b: 22 };
    const root = svg("svg", { width: W, height: H, role: "img", class: "hist" });
    const nb = h.edges.length - 1;
    if (nb < 1) { svg("text", { x: 10, y: 20 }, root).textContent = "no finite scores"; return root; }
    let top = 1; values.forEach((v) => (h.counts[v] || []).forEach((c) => { top = Math.max(top, c); }));
    const bw = (W - P.l - P.r) / nb;
    values.forEach((v, j) => {
      const c = h.counts[v] || [];
      const pts = [];
      c.forEach((cnt, i) => { const yy = P.t + (1 - cnt / top) * (H - P.t - P.b); pts.push((P.l + i * bw) + "," + yy, (P.l + (i + 1) * bw) + "," + yy); });
      svg("polyline", { points: pts.join(" "), fill: "none", stroke: colors[j], "stroke-width": 1.6 }, root);
    });
    svg("text", { x: P.l, y: H - 6 }, root).textContent = fmt(h.edges[0], 2);
    svg("text", { x: W - P.r - 44, y: H - 6 }, root).textContent = fmt(h.edges[nb], 2);
    svg("text", { x: 2, y: P.t + 10 }, root).textContent = String(top);
    return root;
  }

  function compositionChart(comp, values, colors, methods) {
    const rowH = 22, W = 460, L = 110;
    const rows = [];
    methods.forEach((m) => rows.push({ name: m, counts: comp[m].counts, n: comp[m].filtered }));
    const any = methods.length ? comp[methods[0]] : null;
    if (any) rows.push({ name: "random (expected)", counts: any.expected_random, n: any.filtered });
    const root = svg("svg", { width: W, height: rows.length * rowH + 8, role: "img", class: "composition" });
    rows.forEach((r, i) => {
      svg("text", { x: 0, y: i * rowH + 15 }, root).textContent = r.name;
      let x0 = L;
      values.forEach((v, j) => {
        const c = r.counts[v] || 0, w = r.n ? (c / r.n) * (W - L - 10) : 0;
        const rect = svg("rect", { x: x0, y: i * rowH + 4, width: Math.max(0, w), height: rowH - 8, fill: colors[j] }, root);
        svg("title", {}, rect).textContent = v + ": " + fmt(c, Number.isInteger(c) ? 0 : 1) + " of " + r.n;
        x0 += w;
      });
    });
    return root;
  }

  function legend(values, colors) { return '<div class="legend">' + values.map((v, j) => '<span><i style="background:' + colors[j] + '"></i>' + esc(v || "(none)") + "</span>").join("") + "</div>"; }
  function link(kind, h, text) { return '<a href="#' + kind + "/" + esc(h) + '">' + esc(text) + "</a>"; }

  async function overview() {
    const o = await load("overview");
    const c = o.counts;
    const rate = c.known_outcomes ? (100 * c.successes / c.known_outcomes).toFixed(0) + "%" : "–";
    let html = "<h1>" + esc(o.title) + "</h1>";
    html += '<div class="cards">' +
      '<div class="card"><div class="muted">training demos</div><div class="v">' + c.train + "</div></div>" +
      '<div class="card"><div class="muted">all demos</div><div class="v">' + c.demos + "</div></div>" +
      '<div class="card"><div class="muted">rollouts</div><div class="v">' + c.rollouts + "</div></div>" +
      '<div class="card"><div class="muted">rollout success</div><div class="v" id="success-rate">' + rate + '</div><div class="muted">' + c.successes + " of " + c.known_outcomes + "</div></div></div>";
    html += '<p class="muted">Influence: ' + esc(o.influence_sign) + ".</p>";
    if (o.featured) {
      const f = o.featured.rollout;
      html += "<h2>" + (f.success === false ? "Which demos made this rollout fail?" : "Which demos shaped this rollout?") + "</h2><p>" +
        link("rollout", f.h, f.id) + " · " + outcome(f.success) + " · " + f.length + ' steps</p><div class="demos" id="featured"></div>';
    }
    (o.notes || []).forEach((n) => { html += '<p class="muted">Note: ' + esc(n) + "</p>"; });
    if (o.audit) {
      html += "<h2>Audit decisions</h2><table><tr><th>method</th><th>ratio</th><th>verdict</th><th>reason</th></tr>" +
        o.audit.decisions.map((d) => "<tr><td>" + esc(d.method) + "</td><td>" + fmt(d.ratio, 2) + "</td><td><b>" + esc(d.verdict) + "</b></td><td>" + esc(d.reason) + "</td></tr>").join("") + "</table>";
      html += '<h3>Paired success delta vs matched random (mean, CI)</h3><div id="audit-deltas"></div>';
    }
    html += '<h2>Scores by label</h2><div id="hists"></div><h2>What each method would filter (lowest ' + Math.round(100 * o.fraction) + '% of training demos)</h2><div id="comps"></div>';
    html += "<h2>Browse</h2><p>" + link("rollouts", 0, "All " + c.rollouts + " rollouts") + " · " + link("demos", 0, "All " + c.demos + " demos") + "</p>";
    const runs = Object.keys(o.runs).map((r) => "<code>" + esc(r) + "</code> (k = " + o.runs[r].k + ")").join(", ");
    html += '<p class="muted">Run: ' + runs + "</p>";
    main().innerHTML = html;
    if (o.featured) {
      const box = document.getElementById("featured");
      const add = (ref, caption) => {
        const card = document.createElement("div"); card.className = "demo";
        card.innerHTML = '<div class="title">' + caption + "</div>";
        const s = strip(ref.frames, 2); card.appendChild(s);
        s.setStep(ref.length ? Math.floor((ref.length - 1) / 2) : 0);
        box.appendChild(card);
      };
      add(o.featured.rollout, "rollout " + link("rollout", o.featured.rollout.h, o.featured.rollout.id));
      o.featured.demos.forEach((d, i) => add(d, "#" + (i + 1) + " " + link("demo", d.h, d.id) + " · a = " + fmt(d.a)));
    }
    const labels = Object.keys(o.labels);
    const hists = document.getElementById("hists"), comps = document.getElementById("comps");
    if (!o.methods.length) hists.innerHTML = comps.innerHTML = '<p class="muted">No score tables given (--scores NAME=PATH).</p>';
    (labels.length ? labels : ["all"]).forEach((lab) => {
      const values = labels.length ? o.labels[lab] : ["all"], colors = values.map((_, j) => PALETTE[j % PALETTE.length]);
      const sec = document.createElement("div");
      sec.innerHTML = "<h3>" + esc(lab) + "</h3>" + legend(values, colors);
      const grid = document.createElement("div"); grid.className = "grid";
      o.methods.forEach((m) => {
        const p = document.createElement("div"); p.className = "panel"; p.innerHTML = "<b>" + esc(m) + "</b><br>";
        p.appendChild(histChart(o.histograms[m][lab], values, colors)); grid.appendChild(p);
      });
      sec.appendChild(grid); if (o.methods.length) hists.appendChild(sec);
      if (labels.length && o.methods.length) {
        const cs = document.createElement("div"); cs.className = "panel";
        cs.innerHTML = "<b>" + esc(lab) + "</b>" + legend(values, colors);
        cs.appendChild(compositionChart(Object.fromEntries(o.methods.map((m) => [m, o.composition[m][lab]])), values, colors, o.methods));
        comps.appendChild(cs);
      }
    });
    if (o.methods.length && !labels.length) comps.innerHTML = '<p class="muted">No labels (tier or scenario metadata) in the catalog.</p>';
    if (o.audit) {
      const d = o.audit.deltas, box = document.getElementById("audit-deltas");
      const W = 520, rowH = 20, L = 200, root = svg("svg", { width: W, height: d.length * rowH + 20, role: "img" });
      let lo = 0, hi = 0; d.forEach((r) => { [r.ci_low, r.ci_high, r.mean].forEach((v) => { if (v != null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }); });
      if (hi === lo) hi = lo + 1;
      const x = (v) => L + (v - lo) / (hi - lo) * (W - L - 10);
      svg("line", { x1: x(0), x2: x(0), y1: 0, y2: d.length * rowH, stroke: "#999" }, root);
      d.forEach((r, i) => {
        svg("text", { x: 0, y: i * rowH + 14 }, root).textContent = r.rule + " @" + r.ratio + " (" + r.block + ")";
        if (r.ci_low != null && r.ci_high != null) svg("line", { x1: x(r.ci_low), x2: x(r.ci_high), y1: i * rowH + 10, y2: i * rowH + 10, stroke: "#555" }, root);
        if (r.mean != null) svg("circle", { cx: x(r.mean), cy: i * rowH + 10, r: 4, fill: r.mean > 0 ? "#117a65" : "#c0392b" }, root);
      });
      box.appendChild(root);
    }
  }

  function pager(kind, p, n) {
    let h = '<p class="pager">';
    if (p > 0) h += link(kind, p - 1, "« previous");
    h += "<span>page " + (p + 1) + " of " + n + "</span>";
    if (p + 1 < n) h += link(kind, p + 1, "next »");
    return h + "</p>";
  }

  async function rolloutList(p) {
    const d = await load("rollouts/p" + p);
    let h = "<h1>Rollouts (" + d.total + ")</h1>" + pager("rollouts", p, d.pages) +
      "<table><tr><th>rollout</th><th>outcome</th><th>steps</th><th>most influential demo</th><th>a(τ, ξ)</th></tr>";
    d.rows.forEach((r) => { h += "<tr><td>" + link("rollout", r.h, r.id) + "</td><td>" + outcome(r.success) + "</td><td>" + r.length + "</td><td>" + (r.top ? link("demo", r.top_h, r.top) : "–") + "</td><td>" + fmt(r.a) + "</td></tr>"; });
    main().innerHTML = h + "</table>" + pager("rollouts", p, d.pages);
  }

  async function demoList(p) {
    const d = await load("demos/p" + p);
    let h = "<h1>Demos (" + d.total + ")</h1>" + pager("demos", p, d.pages) +
      "<table><tr><th>demo</th><th>split</th><th>steps</th><th>labels</th>" + d.methods.map((m) => "<th>" + esc(m) + "</th>").join("") + "</tr>";
    d.rows.forEach((r) => { h += "<tr><td>" + link("demo", r.h, r.id) + "</td><td>" + esc(r.split) + "</td><td>" + r.length + "</td><td>" + labelText(r.labels) + "</td>" + r.scores.map((s) => "<td>" + fmt(s) + "</td>").join("") + "</tr>"; });
    main().innerHTML = h + "</table>" + pager("demos", p, d.pages);
  }

  async function rolloutPage(h) {
    const d = await load("r/" + h);
    const r = d.rollout, T = r.length;
    let html = "<h1>Rollout " + esc(r.id) + "</h1><p>" + outcome(r.success) + " · " + T + " steps" + (d.task ? " · task: " + esc(d.task) : "") + "</p>" +
      '<p class="muted">Top demos by a(τ, ξ): how much up-weighting each demo raises this rollout\'s likelihood' + (r.success === false ? " — the candidates for what made it fail." : ".") + " Drag the slider or click the plot to move through the rollout; each demo shows the step it most influenced at that rollout step.</p>" +
      '<div class="grid"><div class="panel" id="rframe"></div><div class="panel"><div id="chart"></div><input type="range" class="scrub" id="scrub" min="0" max="' + (T - 1) + '" value="0"> <span id="stepno">step 0</span></div></div>' +
      "<h2>Top influencing demos</h2><div class=\"demos\" id=\"demos\"></div>";
    main().innerHTML = html;
    const big = strip(r.frames, 3); document.getElementById("rframe").appendChild(big);
    let sel = 0;
    const cards = d.demos.map((dm, i) => {
      const card = document.createElement("div"); card.className = "demo"; card.dataset.rank = String(i + 1);
      card.innerHTML = '<div class="title">#' + (i + 1) + " " + link("demo", dm.h, dm.id) + "</div><div>a = " + fmt(dm.a) + " · " + labelText(dm.labels) + '</div><div class="muted step"></div>';
      const f = strip(dm.frames, 2); card.appendChild(f);
      card.addEventListener("mouseenter", () => { sel = i; draw(); });
      document.getElementById("demos").appendChild(card);
      return { card, f, dm };
    });
    let step = 0, chart = null;
    function draw() {
      const series = [{ values: d.total_profile, color: "#999", width: 1 }];
      if (d.demos[sel]) series.push({ values: d.demos[sel].rollout_profile, color: "#c0392b", width: 2 });
      const box = document.getElementById("chart"); box.innerHTML = "";
      box.insertAdjacentHTML("beforeend", '<div class="legend"><span><i style="background:#999"></i>sum over top demos</span><span><i style="background:#c0392b"></i>demo #' + (sel + 1) + "</span></div>");
      chart = lineChart(series, { width: 620, height: 190, onPick: setStep }); box.appendChild(chart); chart.setStep(step);
      cards.forEach((c, i) => { c.card.style.outline = i === sel ? "2px solid #c0392b" : "none"; });
    }
    function setStep(s) {
      step = s; document.getElementById("scrub").value = String(s); document.getElementById("stepno").textContent = "step " + s;
      big.setStep(s); if (chart) chart.setStep(s);
      cards.forEach((c) => { const ds = c.dm.aligned[s]; c.f.setStep(ds); c.card.querySelector(".step").textContent = "demo step " + ds + " of " + c.dm.length; });
    }
    document.getElementById("scrub").addEventListener("input", (e) => setStep(parseInt(e.target.value, 10)));
    draw(); setStep(0);
  }

  async function demoPage(h) {
    const d = await load("d/" + h);
    const r = d.demo;
    let html = "<h1>Demo " + esc(r.id) + "</h1><p>" + esc(r.split) + " · " + r.length + " steps · " + labelText(r.labels) + (d.task ? " · task: " + esc(d.task) : "") + "</p>" +
      '<div class="grid"><div class="panel" id="dframe"></div><div class="panel"><input type="range" class="scrub" id="scrub" min="0" max="' + (r.length - 1) + '" value="0"> <span id="stepno">step 0</span></div></div>';
    const ms = Object.keys(d.scores);
    html += "<h2>Scores</h2>" + (ms.length ? "<table><tr><th>method</th><th>score</th><th>rank</th></tr>" + ms.map((m) => "<tr><td>" + esc(m) + "</td><td>" + fmt(d.scores[m].score) + "</td><td>" + d.scores[m].rank + " of " + d.scores[m].of + "</td></tr>").join("") + "</table>" : '<p class="muted">No score tables.</p>');
    html += "<h2>Rollouts it influenced most</h2>" + (d.rollouts.length ? "<table><tr><th>rollout</th><th>outcome</th><th>a(τ, ξ)</th></tr>" + d.rollouts.map((x) => "<tr><td>" + link("rollout", x.h, x.id) + "</td><td>" + outcome(x.success) + "</td><td>" + fmt(x.a) + "</td></tr>").join("") + "</table>" : '<p class="muted">Not a training demo, or no rollouts.</p>');
    main().innerHTML = html;
    const f = strip(r.frames, 3); document.getElementById("dframe").appendChild(f);
    document.getElementById("scrub").addEventListener("input", (e) => { const s = parseInt(e.target.value, 10); f.setStep(s); document.getElementById("stepno").textContent = "step " + s; });
  }

  async function route() {
    const parts = (location.hash.replace(/^#/, "") || "overview").split("/");
    try {
      if (parts[0] === "rollouts") await rolloutList(parseInt(parts[1] || "0", 10));
      else if (parts[0] === "demos") await demoList(parseInt(parts[1] || "0", 10));
      else if (parts[0] === "rollout") await rolloutPage(parts[1]);
      else if (parts[0] === "demo") await demoPage(parts[1]);
      else await overview();
      document.body.dataset.page = parts[0];
      window.scrollTo(0, 0);
    } catch (err) {
      main().innerHTML = '<p class="fail">Could not show this page: ' + esc(err.message) + "</p>";
      document.body.dataset.page = "error";
    }
  }
  window.addEventListener("hashchange", route);
  route();
})();
