// soundwatch web page. Plain JavaScript, no libraries, no CDN: the page must
// work on an isolated plant network. Data comes from the JSON API; values
// from the server are put in the page with textContent only.
"use strict";
(() => {
  const body = document.body;
  const MODE = body.dataset.mode;
  const FIELD = body.dataset.field || "file";
  const MAX_UPLOAD = Number(body.dataset.maxUpload || 0);
  const TOKEN_KEY = "soundwatch.token";
  const PALETTE = ["#2da44e", "#d97706", "#8250df", "#cf222e", "#1f6feb", "#bf3989", "#0a7ea4"];
  const $ = (id) => document.getElementById(id);

  let classNames = [];
  let olderEvents = [];
  let nextBefore = null;

  // --- API access -----------------------------------------------------------

  function storedToken() {
    try { return localStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = new Headers(opts.headers || {});
    const token = storedToken();
    if (token) headers.set("Authorization", "Bearer " + token);
    const res = await fetch(path, Object.assign({}, opts, { headers: headers, cache: "no-store" }));
    if (res.status === 401) $("tokenbar").hidden = false;
    const type = res.headers.get("Content-Type") || "";
    let data;
    if (type.indexOf("application/json") >= 0) {
      data = await res.json();
    } else {
      data = { Error: (await res.text()).trim() || res.statusText };
    }
    return { res: res, data: data };
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    try { localStorage.setItem(TOKEN_KEY, $("token").value.trim()); } catch (e) { /* private mode */ }
    $("tokenbar").hidden = true;
    refreshAll();
  });

  // --- small DOM helpers ----------------------------------------------------

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function colorFor(name) {
    const css = getComputedStyle(document.documentElement).getPropertyValue("--c-" + name).trim();
    if (css) return css;
    const i = classNames.indexOf(name);
    return PALETTE[(i >= 0 ? i : name.length) % PALETTE.length];
  }

  function pct(p) { return (100 * p).toFixed(1) + " %"; }

  function renderBars(container, probs) {
    // probs: [[name, p], ...]
    container.textContent = "";
    let best = -1;
    probs.forEach((item, i) => { if (best < 0 || item[1] > probs[best][1]) best = i; });
    probs.forEach((item, i) => {
      const row = el("div", "bar" + (i === best ? " best" : ""));
      const name = el("span", "bar-name", item[0]);
      const track = el("span", "track");
      const fill = el("span", "fill");
      fill.style.width = Math.max(0, Math.min(100, 100 * item[1])).toFixed(1) + "%";
      fill.style.background = colorFor(item[0]);
      track.appendChild(fill);
      row.append(name, track, el("span", "bar-value", pct(item[1])));
      row.dataset.cls = item[0];
      container.appendChild(row);
    });
  }

  function setMeter(fillId, valueId, dbfs) {
    const fill = $(fillId);
    const value = $(valueId);
    if (dbfs === null || dbfs === undefined) {
      fill.style.width = "0";
      value.textContent = "silent";
      return;
    }
    // -90 dBFS (16-bit floor) .. 0 dBFS (full scale)
    const w = Math.max(0, Math.min(100, (dbfs + 90) / 90 * 100));
    fill.style.width = w.toFixed(1) + "%";
    value.textContent = dbfs.toFixed(1) + " dBFS";
  }

  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  // --- health -------------------------------------------------------------

  async function refreshHealth() {
    const pill = $("health");
    try {
      const r = await api("/health");
      const h = r.data;
      // Without the token (when the server has one) /health says only {"status": ...}.
      const ok = r.res.status === 200 && (h.healthy === true || h.status === "ok");
      pill.dataset.state = ok ? "healthy" : "unhealthy";
      let text = ok ? "healthy" : "unhealthy";
      if (!ok && h.source && h.source.state) text += " · source " + h.source.state;
      $("health-text").textContent = text;
      // The device as opened (a name the config only matched a part of, its rate).
      if (h.source && h.source.device && document.body.dataset.mode === "run") {
        const kind = document.body.dataset.sourceType || "";
        const device = kind === "file" ? h.source.device.split("/").pop() : h.source.device;
        $("source").textContent = (kind ? kind + ": " : "") + device +
          (h.source.device_rate_hz ? " @ " + h.source.device_rate_hz + " Hz" : "");
      }
      pill.title = "GET /health → " + r.res.status + (h.source && h.source.detail ? " · " + h.source.detail : "");
    } catch (e) {
      pill.dataset.state = "unhealthy";
      $("health-text").textContent = "unreachable";
    }
  }

  // --- model info -----------------------------------------------------------

  function kv(dl, entries) {
    dl.textContent = "";
    entries.forEach((pair) => {
      dl.append(el("dt", null, pair[0]), el("dd", null, pair[1]));
    });
  }

  function flatMetrics(obj, prefix, out) {
    Object.keys(obj || {}).forEach((k) => {
      const v = obj[k];
      const key = prefix ? prefix + "." + k : k;
      if (typeof v === "number") out.push([key, Number.isInteger(v) ? String(v) : v.toFixed(4)]);
      else if (typeof v === "string" || typeof v === "boolean") out.push([key, String(v)]);
      else if (v && typeof v === "object" && !Array.isArray(v) && !prefix) flatMetrics(v, key, out);
    });
    return out;
  }

  // The bundle's metrics are nested (per class, per SNR, confusion matrices);
  // the panel shows the few figures a person compares, the rest is in "details".
  function metricSummary(m) {
    if (!m || !m.int8 || !m.int8.per_snr) return flatMetrics(m, "", []).slice(0, 14);
    const snrs = (part) => Object.keys(part.per_snr).map((k) => k + " " + part.per_snr[k].toFixed(3)).join(" · ");
    const out = [["held-out unit", String(m.held_out_unit || "–")], ["int8 accuracy", snrs(m.int8)]];
    if (m.float && m.float.per_snr) out.push(["float accuracy", snrs(m.float)]);
    if (m.int8_vs_float) out.push(["int8/float agree", m.int8_vs_float.top1_agreement.toFixed(3)]);
    return out;
  }

  async function refreshInfo() {
    const r = await api("/info");
    if (!r.res.ok) return;
    const info = r.data;
    classNames = info.classes || [];
    $("model-version").textContent = info.model_version || (info.name + "@" + info.version);
    const spec = info.feature_spec || {};
    const server = info.server || {};
    kv($("model-kv"), [
      ["model", info.model_version],
      ["backend", server.backend || "–"],
      ["input", (info.input_shape || []).join("×") + " " + (info.input_dtype || "")],
      ["window", server.window_s ? server.window_s + " s" : "–"],
      ["features", spec.n_mfcc + " MFCC · " + spec.sample_rate_hz + " Hz · n_fft " + spec.n_fft + " · hop " + spec.hop_length],
      ["uploads", (server.classifiers || 1) + " at a time, ≤ " + ((server.max_upload_bytes || 0) / 1048576) + " MiB"],
    ]);
    const list = $("model-classes");
    list.textContent = "";
    classNames.forEach((name) => {
      const li = el("li");
      const sw = el("span", "swatch");
      sw.style.background = colorFor(name);
      const thr = (info.thresholds || {})[name];
      li.append(sw, el("strong", null, name), document.createTextNode(" · " + ((info.messages || {})[name] || "") + (thr !== undefined ? " (alarm at p ≥ " + thr + ")" : "")));
      list.appendChild(li);
    });
    const metrics = metricSummary(info.metrics);
    kv($("model-metrics"), metrics.length ? metrics : [["–", "none in this bundle"]]);
    $("model-details").textContent = JSON.stringify(
      { feature_spec: spec, thresholds: info.thresholds, provenance: info.provenance, metrics: info.metrics }, null, 2);
  }

  // --- live state (run mode) ------------------------------------------------

  async function refreshState() {
    const r = await api("/state");
    if (!r.res.ok) return;
    const s = r.data;
    if (s.level) {
      setMeter("rms-fill", "rms-value", s.level.rms_dbfs);
      setMeter("peak-fill", "peak-value", s.level.peak_dbfs);
    }
    const st = s.state;
    if (!st) return;
    const label = $("current-class");
    label.textContent = st.class;
    label.style.color = colorFor(st.class);
    $("current-message").textContent = st.Message + (st.warming_up ? " · warming up" : "");
    const probs = Object.keys(st.Probabilities).map((k) => [k, st.Probabilities[k]]);
    renderBars($("live-probs"), probs);
    $("active").hidden = !st.active_class;
    $("active-class").textContent = st.active_class || "";
    $("live-meta").textContent = "window " + st.window_index + " · stream " +
      st.stream_start_s.toFixed(1) + "–" + st.stream_end_s.toFixed(1) + " s · " + when(st.emitted_at);
    renderBaseline(st);
  }

  function clock(seconds) {
    const total = Math.max(0, Math.floor(seconds));
    const h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
    const two = (n) => (n < 10 ? "0" : "") + n;
    return h ? h + ":" + two(m) + ":" + two(s) : m + ":" + two(s);
  }

  // The per-unit baseline: learning progress, then each window's novelty
  // against the threshold. States have no "learning" key when it is off.
  function renderBaseline(st) {
    const box = $("baseline");
    if (!("learning" in st)) { box.hidden = true; return; }
    box.hidden = false;
    const fill = $("baseline-fill");
    if (st.learning) {
      const f = Math.min(1, st.learning.learned_s / st.learning.learn_s);
      $("baseline-name").textContent = "learned";
      fill.style.width = (100 * f).toFixed(1) + "%";
      fill.classList.remove("alert");
      $("baseline-value").textContent = Math.floor(100 * f) + " %";
      $("baseline-text").textContent = "learning: " + clock(st.learning.learned_s) + " of " +
        clock(st.learning.learn_s) + " · until then the classifier alone decides, at strict thresholds";
      return;
    }
    $("baseline-name").textContent = "novelty";
    const n = st.novelty;
    if (!n) {
      fill.style.width = "0";
      $("baseline-value").textContent = "–";
      $("baseline-text").textContent = "baseline " + st.baseline_id + " · this window cannot be judged";
      return;
    }
    // The bar is full at twice the threshold; past the threshold it turns red.
    fill.style.width = Math.min(100, 50 * n.score / n.threshold).toFixed(1) + "%";
    fill.classList.toggle("alert", n.score > n.threshold);
    $("baseline-value").textContent = n.score.toPrecision(3);
    $("baseline-text").textContent = "baseline " + st.baseline_id + " · threshold " +
      n.threshold.toPrecision(3) + (n.score > n.threshold ? " · differs from this unit's normal" : " · like this unit's normal");
  }

  // --- events -------------------------------------------------------------

  function eventRow(ev) {
    const tr = el("tr");
    const type = ev.type === "anomaly_started" ? "started" : ev.type === "anomaly_ended" ? "ended" : ev.type;
    const tag = el("span", "tag " + type, type);
    const cls = el("td");
    const sw = el("span", "swatch");
    sw.style.background = colorFor(ev.class);
    cls.append(sw, document.createTextNode(ev.class));
    const typeCell = el("td");
    typeCell.appendChild(tag);
    tr.append(
      el("td", "num", ev.seq),
      el("td", null, when(ev.time_end || ev.emitted_at)),
      typeCell,
      cls,
      el("td", null, ev.Message),
      el("td", "num", ev.probability_max !== undefined ? ev.probability_max.toFixed(3) : "–"),
      el("td", "num", ev.duration_s !== undefined ? ev.duration_s.toFixed(1) + " s" : "–"),
    );
    return tr;
  }

  function renderEvents(events) {
    const tbody = $("events-body");
    tbody.textContent = "";
    const all = events.concat(olderEvents);
    if (!all.length) {
      const tr = el("tr", "empty");
      const td = el("td", null, "no events yet");
      td.colSpan = 7;
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
    all.forEach((ev) => tbody.appendChild(eventRow(ev)));
  }

  async function refreshEvents() {
    const r = await api("/events?limit=20");
    if (!r.res.ok) return;
    if (!olderEvents.length) nextBefore = r.data.next_before_seq;
    $("events-more").hidden = nextBefore === null;
    renderEvents(r.data.events);
  }

  $("events-more").addEventListener("click", async () => {
    if (nextBefore === null) return;
    const r = await api("/events?limit=20&before_seq=" + encodeURIComponent(nextBefore));
    if (!r.res.ok) return;
    olderEvents = olderEvents.concat(r.data.events);
    nextBefore = r.data.next_before_seq;
    refreshEvents();
  });

  // --- upload -------------------------------------------------------------

  const form = $("upload");
  const input = $("file");
  const drop = $("drop");

  input.addEventListener("change", () => {
    $("file-name").textContent = input.files.length ? input.files[0].name : "Choose or drop an audio file";
  });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => {
    ev.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    if (ev.dataTransfer && ev.dataTransfer.files.length) {
      input.files = ev.dataTransfer.files;
      input.dispatchEvent(new Event("change"));
    }
  });

  function showError(message) {
    const result = $("result");
    result.dataset.state = "error";
    $("result-verdict").hidden = true;
    $("result-probs").textContent = "";
    $("result-warnings").textContent = "";
    $("result-meta").textContent = "";
    $("result-error").hidden = false;
    $("result-error").textContent = message;
  }

  function showResult(data) {
    const result = $("result");
    $("result-error").hidden = true;
    $("result-verdict").hidden = false;
    const badge = $("result-badge");
    badge.textContent = data.Anomaly ? "ANOMALY" : "OK";
    badge.className = "badge big " + (data.Anomaly ? "bad" : "ok");
    const label = $("result-label");
    label.textContent = data.Label;
    label.style.color = colorFor(data.Label);
    $("result-message").textContent = data.Details.Message + " · " + data.File;
    const names = data.Classes || classNames;
    renderBars($("result-probs"), data.Details.Probabilities.map((p, i) => [names[i] || "class " + i, p]));
    const warnings = $("result-warnings");
    warnings.textContent = "";
    (data.Warnings || []).forEach((w) => warnings.appendChild(el("li", null, w)));
    const a = data.Audio || {};
    const t = data.TimingMs || {};
    const total = Object.keys(t).reduce((s, k) => s + t[k], 0);
    $("result-meta").textContent = a.source_rate_hz + " Hz · " + a.channels + " ch · " +
      a.duration_s + " s (analysed " + a.analysed_s + " s) · decode " + (t.decode || 0).toFixed(1) +
      " ms, features " + (t.features || 0).toFixed(1) + " ms, inference " + (t.inference || 0).toFixed(2) +
      " ms, total " + total.toFixed(1) + " ms";
    result.dataset.state = "done";
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = input.files[0];
    if (!file) { showError("Choose an audio file first."); return; }
    if (MAX_UPLOAD && file.size > MAX_UPLOAD) {
      showError(file.name + " is " + (file.size / 1048576).toFixed(1) + " MiB; the limit is " +
        (MAX_UPLOAD / 1048576) + " MiB. The model looks at the first 10 s: send a shorter clip.");
      return;
    }
    const button = $("classify");
    button.disabled = true;
    button.textContent = "Classifying…";
    $("result").dataset.state = "busy";
    try {
      const data = new FormData();
      data.append(FIELD, file, file.name);
      const r = await api(form.getAttribute("action"), { method: "POST", body: data });
      if (r.res.ok) showResult(r.data);
      else showError(r.res.status + " " + (r.data.Code || r.res.statusText) + ": " + (r.data.Error || ""));
    } catch (e) {
      showError("The request failed: " + e);
    } finally {
      button.disabled = false;
      button.textContent = "Classify";
    }
  });

  // --- polling --------------------------------------------------------------

  function every(ms, fn) {
    const tick = async () => {
      if (!document.hidden) {
        try { await fn(); } catch (e) { /* the next tick retries */ }
      }
      setTimeout(tick, ms);
    };
    tick();
  }

  function refreshAll() {
    refreshInfo().catch(() => {});
    refreshHealth();
    if (MODE === "run") {
      refreshState().catch(() => {});
      refreshEvents().catch(() => {});
    }
  }

  refreshInfo().catch(() => {});
  every(5000, refreshHealth);
  if (MODE === "run") {
    every(1000, refreshState);
    every(3000, refreshEvents);
  }
})();
