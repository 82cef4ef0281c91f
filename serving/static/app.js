// carepath clinician page: pick or enter a patient, ask for the ranked next steps, record the decision.
// No framework and no inline code: the page runs under "Content-Security-Policy: default-src 'self'".
// Every piece of server text is put in the page with textContent, never as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "carepath.token"; // sessionStorage only: gone when the tab closes, never in the URL
  const SVG_NS = "http://www.w3.org/2000/svg";

  // Clinician words for the API's feature names; a feature the API adds later still gets a field.
  const LABELS = {
    phq9: "PHQ-9 total",
    phq9_item9: "PHQ-9 item 9 (self-harm)",
    gad7: "GAD-7 total",
    weeks_since_measurement: "Weeks since PHQ-9 measured",
    phq9_change_4w: "PHQ-9 change in 4 weeks",
    phq9_at_intake: "PHQ-9 at intake",
    treatment_level: "Treatment step",
    weeks_on_step: "Weeks on this step",
    dose_level: "Dose level (0 = no drug)",
    weeks_on_dose: "Weeks since dose change",
    on_psychotherapy: "In psychotherapy",
    on_digital: "Digital CBT",
    on_augmentation: "Augmented",
    in_specialist_care: "In specialist care",
    side_effect_burden: "Side-effect burden",
    adherence: "Adherence (share of doses)",
    engagement: "Engagement",
    weeks_in_care: "Weeks in care",
    weeks_well: "Weeks in sustained remission (PHQ-9 < 5, none >= 10 since)",
    age_band: "Age band",
    sex: "Sex",
    prior_episodes: "Prior episodes",
    digital_access: "Digital access",
    sleep_hours: "Sleep (hours a night)",
    daily_steps: "Daily steps (thousands)",
  };
  const GROUPS = [
    ["Symptoms", ["phq9", "phq9_item9", "gad7", "phq9_change_4w", "phq9_at_intake", "weeks_since_measurement"]],
    ["Current care", ["treatment_level", "weeks_on_step", "dose_level", "weeks_on_dose", "on_psychotherapy",
      "on_digital", "on_augmentation", "in_specialist_care", "weeks_in_care", "weeks_well"]],
    ["Tolerability and engagement", ["side_effect_burden", "adherence", "engagement"]],
    ["Patient", ["age_band", "sex", "prior_episodes", "digital_access"]],
    ["Wearable (often missing)", ["sleep_hours", "daily_steps"]],
  ];
  // Coded integer features shown as a choice; 0/1 flags not listed here become no/yes.
  const CHOICES = {
    sex: ["female", "male"],
    age_band: ["18-29", "30-44", "45-59", "60+"],
    on_digital: ["none", "guided", "unguided"],
  };

  const $ = (id) => document.getElementById(id);
  const state = { fields: {}, examples: [], redraw: [] };

  // ------------------------------------------------------------------ small DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "className") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(x, digits = 1) {
    return Math.abs(x) < 0.5 * Math.pow(10, -digits) ? (0).toFixed(digits) : x.toFixed(digits);
  }

  function fmtValue(x) {
    return Number.isInteger(x) ? String(x) : String(Math.round(x * 100) / 100);
  }

  function percent(p) {
    const value = 100 * p;
    if (value > 0 && value < 0.5) return "< 1 %";
    if (value < 100 && value > 99.5) return "> 99 %";
    return Math.round(value) + " %";
  }

  function labelOf(name) {
    return LABELS[name] || name.replace(/_/g, " ");
  }

  // ------------------------------------------------------------------ token

  function token() {
    return $("token").value.trim();
  }

  function initToken() {
    const input = $("token");
    input.value = sessionStorage.getItem(TOKEN_KEY) || "";
    input.addEventListener("input", () => {
      const value = token();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    });
    $("token-form").addEventListener("submit", (event) => event.preventDefault()); // Enter: nothing to send
    $("forget-token").addEventListener("click", () => {
      input.value = "";
      sessionStorage.removeItem(TOKEN_KEY);
      input.focus();
    });
  }

  // ------------------------------------------------------------------ API calls

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token()) headers.Authorization = "Bearer " + token();
    let response;
    try {
      response = await fetch(path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "same-origin", cache: "no-store",
      });
    } catch (err) {
      throw new ApiError(0, "the server could not be reached (" + err.message + ")", null);
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) throw new ApiError(response.status, describeError(response, data), data);
    return data;
  }

  class ApiError extends Error {
    constructor(status, message, data) {
      super(message);
      this.status = status;
      this.data = data;
    }
  }

  function describeError(response, data) {
    const detail = data && data.detail;
    let text;
    if (Array.isArray(detail)) {
      // FastAPI's 422: [{loc: ["body", "features", "phq9"], msg: "..."}]
      text = detail.map((d) => {
        const where = (d.loc || []).filter((part) => part !== "body").join(".");
        return (where ? where + ": " : "") + d.msg;
      }).join("; ");
    } else if (typeof detail === "string") {
      text = detail;
    } else {
      text = response.statusText || "request failed";
    }
    const what = {
      401: "Not signed in",
      403: "Not allowed",
      404: "Not found",
      413: "Too large",
      422: "Please check the patient's features",
    }[response.status] || "The server refused the request";
    return what + " (" + response.status + "): " + text;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    const box = $("error");
    box.textContent = "";
    box.hidden = true;
    for (const input of Object.values(state.fields)) input.removeAttribute("aria-invalid");
  }

  // ------------------------------------------------------------------ the feature form (from /openapi.json)

  function featureSchema(openapi) {
    const schema = openapi && openapi.components && openapi.components.schemas &&
      openapi.components.schemas.PatientFeatures;
    if (!schema || !schema.properties) throw new Error("/openapi.json has no PatientFeatures schema");
    return schema.properties;
  }

  function numericSpec(prop) {
    const options = prop.anyOf || [prop];
    const spec = options.find((o) => o.type === "integer" || o.type === "number") || {};
    return { integer: spec.type === "integer", min: spec.minimum, max: spec.maximum };
  }

  function buildField(name, prop) {
    const spec = numericSpec(prop);
    const id = "f-" + name;
    const helpId = id + "-help";
    const range = spec.min !== undefined && spec.max !== undefined ? spec.min + " to " + spec.max : "";
    const humanName = name.replace(/_/g, " ");
    const description = prop.description && prop.description !== humanName ? prop.description : "";
    // the range, unless the API's description already gives it ("last PHQ-9 total (0-27)")
    let help = /\(\s*-?\d+\s*-\s*\d+\s*\)/.test(description) ? description : [range, description].filter(Boolean).join(" · ");
    let input;
    const choices = CHOICES[name] || (spec.integer && spec.min === 0 && spec.max === 1 ? ["no", "yes"] : null);
    if (spec.integer && choices && spec.max - spec.min + 1 === choices.length) {
      input = el("select", { id, name, "data-testid": "feature-" + name, "aria-describedby": helpId,
        "data-min": spec.min, "data-max": spec.max, "data-integer": "true" },
      el("option", { value: "", text: "— missing —" }));
      choices.forEach((label, i) => input.append(el("option", { value: spec.min + i, text: (spec.min + i) + ": " + label })));
      help = ""; // the options say it all
      input.removeAttribute("aria-describedby");
    } else {
      input = el("input", { id, name, type: "number", inputmode: spec.integer ? "numeric" : "decimal",
        min: spec.min, max: spec.max, step: spec.integer ? 1 : "any", "data-testid": "feature-" + name,
        "data-integer": spec.integer ? "true" : "false", "aria-describedby": helpId, autocomplete: "off" });
    }
    state.fields[name] = input;
    return el("div", { className: "field feature" },
      el("label", { for: id, text: labelOf(name) }),
      input,
      help ? el("span", { className: "help", id: helpId, text: help }) : null);
  }

  function buildForm(properties) {
    const holder = $("features");
    holder.textContent = "";
    const names = Object.keys(properties);
    const groups = GROUPS.map(([title, members]) => [title, members.filter((n) => names.includes(n))]);
    groups.push(["Other", names.filter((n) => !GROUPS.some(([, members]) => members.includes(n)))]);
    for (const [title, members] of groups) {
      if (!members.length) continue;
      const fieldset = el("fieldset", { className: "feature-group" }, el("legend", { text: title }));
      const grid = el("div", { className: "feature-grid" });
      for (const name of members) {
        grid.append(buildField(name, properties[name]));
      }
      fieldset.append(grid);
      holder.append(fieldset);
    }
  }

  function readFeatures() {
    const features = {};
    const problems = [];
    for (const [name, input] of Object.entries(state.fields)) {
      if (input.validity && input.validity.badInput) {
        problems.push(labelOf(name) + " (" + name + ") is not a number");
        input.setAttribute("aria-invalid", "true");
        continue;
      }
      const raw = input.value.trim();
      if (raw === "") continue; // missing: not sent
      features[name] = Number(raw);
    }
    return { features, problems };
  }

  function fillForm(features) {
    for (const [name, input] of Object.entries(state.fields)) {
      const value = features[name];
      input.value = value === undefined || value === null ? "" : String(value);
    }
  }

  // ------------------------------------------------------------------ examples

  function initExamples(data) {
    state.examples = (data && data.patients) || [];
    const select = $("example");
    for (const patient of state.examples) select.append(el("option", { value: patient.id, text: patient.name }));
    select.addEventListener("change", () => {
      const patient = state.examples.find((p) => p.id === select.value);
      $("example-help").textContent = patient ? patient.name : "";
      clearError();
      fillForm(patient ? patient.features : {});
    });
  }

  // ------------------------------------------------------------------ recommend

  const SAFETY_FIELDS = ["phq9_item9", "dose_level", "weeks_on_dose", "weeks_on_step", "on_augmentation",
    "on_psychotherapy", "on_digital", "digital_access", "in_specialist_care", "weeks_well"];

  async function recommend(event) {
    event.preventDefault();
    clearError();
    const { features, problems } = readFeatures();
    if (problems.length) {
      showError("Please check the patient's features: " + problems.join("; "));
      return;
    }
    // the fields the safety rules read (envs/rules.py RULE_FEATURES): ask for them before answering;
    // a second press answers with the cautious assumption for each, which the answer lists
    const missing = SAFETY_FIELDS.filter((name) => state.fields[name] && !(name in features));
    const key = missing.join(",");
    if (missing.length && state.confirmedMissing !== key) {
      state.confirmedMissing = key;
      showError("The safety rules read these fields, which are empty: " + missing.map(labelOf).join(", ") +
        ". Enter them, or press Recommend again to answer assuming each the cautious way " +
        "(a step it could rule out is not suggested, and the answer says what was assumed).");
      return;
    }
    const body = { features, top_k: Number($("top-k").value), explain: true };
    const patientId = $("patient-id").value.trim();
    if (patientId) body.patient_id = patientId;
    const button = $("recommend");
    button.disabled = true;
    button.textContent = "Recommending…";
    $("results").setAttribute("aria-busy", "true");
    try {
      render(await api("POST", "/v1/recommendations", body));
    } catch (err) {
      markInvalidFields(err);
      showError(err.message);
    } finally {
      button.disabled = false;
      button.textContent = "Recommend";
      $("results").removeAttribute("aria-busy");
    }
  }

  function markInvalidFields(err) {
    const detail = err && err.data && err.data.detail;
    if (!Array.isArray(detail)) return;
    for (const d of detail) {
      const loc = d.loc || [];
      const i = loc.indexOf("features");
      const input = i >= 0 ? state.fields[loc[i + 1]] : null;
      if (input) input.setAttribute("aria-invalid", "true");
    }
  }

  // ------------------------------------------------------------------ results

  function render(answer) {
    state.redraw = [];
    if (answer.decision_support) $("decision-support").textContent = answer.decision_support;
    $("placeholder").hidden = true;
    $("results").hidden = false;
    renderAlerts(answer);
    renderSuggestions(answer);
    renderBlocked(answer.blocked || []);
    renderImputed(answer.imputed || []);
    $("uncertainty").textContent = answer.uncertainty || "";
    const policy = answer.policy || {};
    $("policy").textContent = "Policy " + policy.name + ", version " + policy.version +
      (policy.algorithm ? " (" + policy.algorithm + ")" : "") + (policy.created ? ", built " + policy.created : "");
    renderCertification(policy.certification);
    const evaluation = $("evaluation");
    evaluation.textContent = "";
    for (const line of policy.evaluation_summary || []) evaluation.append(el("li", { text: line }));
    $("audit-id").textContent = answer.audit_id || "";
    state.answer = answer;
    redrawAll();
  }

  // Whether logged data vouches for the policy: a banner, amber when it does not
  function renderCertification(cert) {
    const banner = $("certification");
    if (!cert) { banner.hidden = true; return; }
    banner.hidden = false;
    banner.className = "certification " + (cert.certified ? "certified" : "not-certified");
    banner.setAttribute("role", cert.certified ? "status" : "alert");
    banner.textContent = cert.statement + (cert.first_choice ? " First-ranked step alone: " + cert.first_choice + "." : "") +
      (cert.id ? " (" + cert.id + ")" : "");
  }

  function renderAlerts(answer) {
    const holder = $("alerts");
    holder.textContent = "";
    (answer.alerts || []).forEach((text, i) => {
      const critical = /^CRITICAL\b/.test(text) || (answer.critical && i === 0);
      holder.append(el("div", {
        className: "alert " + (critical ? "critical" : "warning"),
        role: critical ? "alert" : "status",
        "data-testid": critical ? "alert-critical" : "alert",
        text,
      }));
    });
  }

  function renderSuggestions(answer) {
    const list = $("suggestions");
    list.textContent = "";
    const suggestions = answer.suggestions || [];
    // one scale for every chart of this answer, so bars compare across steps
    let benefitSpan = 1;
    let shapMax = 0;
    for (const s of suggestions) {
      if (s.benefit) {
        benefitSpan = Math.max(benefitSpan, Math.abs(s.benefit.low), Math.abs(s.benefit.high),
          Math.abs(s.benefit.phq9_change_vs_continue));
      }
      for (const c of (s.rationale && s.rationale.contributions) || []) shapMax = Math.max(shapMax, Math.abs(c.shap));
    }
    benefitSpan = Math.ceil(benefitSpan);
    for (const s of suggestions) list.append(suggestionItem(answer, s, benefitSpan, shapMax));
  }

  function suggestionItem(answer, s, benefitSpan, shapMax) {
    const headingId = "step-" + s.rank;
    const item = el("li", { className: "suggestion" + (s.critical ? " critical" : ""), "data-testid": "suggestion",
      "data-action": s.action, "aria-labelledby": headingId });
    const head = el("div", { className: "suggestion-head" },
      el("span", { className: "rank", "aria-hidden": "true", text: String(s.rank) }),
      el("h3", { id: headingId, "data-testid": "suggestion-label" },
        el("span", { className: "visually-hidden", text: "Step " + s.rank + ": " }), s.label),
      el("span", { className: "probability", "data-testid": "probability",
        text: "policy probability " + percent(s.probability) }));
    if (s.critical) head.append(el("span", { className: "badge critical", text: "critical: act today" }));
    item.append(head);

    if (s.benefit) {
      const text = benefitText(s);
      const chart = el("div", { className: "interval-chart" });
      item.append(el("div", { className: "benefit" },
        el("p", { className: "benefit-text", "data-testid": "benefit", text }), chart));
      state.redraw.push(() => drawInterval(chart, s.benefit, benefitSpan, text));
    }

    if (s.rationale && s.rationale.contributions.length) {
      const chart = el("div", { className: "rationale-chart" });
      const r = s.rationale;
      item.append(el("div", { className: "rationale" },
        el("h4", { text: "Why the policy ranks this step here" }),
        el("p", { className: "legend" },
          el("span", { className: "legend-item" },
            el("span", { className: "swatch up", "aria-hidden": "true" }), "pushes this step up"),
          el("span", { className: "legend-item" },
            el("span", { className: "swatch down", "aria-hidden": "true" }), "pushes this step down")),
        chart,
        el("p", { className: "muted small",
          text: "Top contributions (SHAP) to the policy's score " + fmt(r.score, 2) + " from a base of " +
            fmt(r.base_value, 2) + ". " + r.method + "." })));
      state.redraw.push(() => drawRationale(chart, r.contributions, shapMax, s.label));
    }

    item.append(feedbackControls(answer, s));
    return item;
  }

  function benefitText(s) {
    const b = s.benefit;
    const over = "over " + b.horizon_weeks + (b.horizon_weeks === 1 ? " week" : " weeks");
    const level = Math.round(100 * b.level) + " % interval ";
    if (s.action === "continue") {
      return "The reference: every other step's PHQ-9 change is compared with continuing " + over + ".";
    }
    const c = b.phq9_change_vs_continue;
    const head = Math.abs(c) < 0.05 ? "PHQ-9 about the same as continuing " + over
      : "PHQ-9 " + fmt(Math.abs(c)) + (c < 0 ? " lower" : " higher") + " than continuing " + over;
    return head + " (" + level + intervalText(b.low, b.high) + ")";
  }

  function intervalText(low, high) {
    // on the rounded figures, so that a bound of -0.04 reads "0.0 to 0.4 higher", not "0.0 lower to ..."
    const lo = Math.round(low * 10) / 10;
    const hi = Math.round(high * 10) / 10;
    if (hi <= 0) return fmt(-hi) + " to " + fmt(-lo) + " lower";
    if (lo >= 0) return fmt(lo) + " to " + fmt(hi) + " higher";
    return fmt(-lo) + " lower to " + fmt(hi) + " higher";
  }

  function redrawAll() {
    for (const draw of state.redraw) draw();
  }

  function chartWidth(holder, fallback) {
    const w = holder.clientWidth;
    return w > 0 ? w : fallback;
  }

  // The expected PHQ-9 change against continuing: the interval as a bar, the estimate as a dot, 0 = continue.
  function drawInterval(holder, b, span, label) {
    holder.textContent = "";
    const width = Math.min(chartWidth(holder, 360), 420);
    const height = 50;
    const pad = 14;
    const axisY = 24;
    const mid = width / 2;
    const x = (v) => mid + (Math.max(-span, Math.min(span, v)) / span) * (mid - pad);
    const chart = svg("svg", { width, height, viewBox: "0 0 " + width + " " + height, role: "img",
      "aria-label": label, "data-testid": "interval-chart", class: "chart" });
    chart.append(svg("text", { x: mid, y: 9, class: "tick", "text-anchor": "middle" }, "continuing"));
    chart.append(svg("line", { x1: pad, x2: width - pad, y1: axisY, y2: axisY, class: "axis" }));
    chart.append(svg("line", { x1: mid, x2: mid, y1: 13, y2: axisY + 10, class: "zero" }));
    const lo = x(b.low);
    const hi = x(b.high);
    chart.append(svg("rect", { x: lo, y: axisY - 4, width: Math.max(hi - lo, 1.5), height: 8, rx: 3,
      class: "interval" + (b.high <= 0 ? " better" : b.low >= 0 ? " worse" : "") }));
    chart.append(svg("circle", { cx: x(b.phq9_change_vs_continue), cy: axisY, r: 4.5, class: "estimate" }));
    chart.append(svg("text", { x: pad, y: 46, class: "tick", "text-anchor": "start" }, "← lower PHQ-9 (better)"));
    chart.append(svg("text", { x: width - pad, y: 46, class: "tick", "text-anchor": "end" },
      "higher (worse) →"));
    holder.append(chart);
  }

  // The rationale: one bar per contribution, length |SHAP|, colour by sign, labelled with its text.
  function drawRationale(holder, contributions, shapMax, stepLabel) {
    holder.textContent = "";
    const width = chartWidth(holder, 560);
    const stacked = width < 460; // narrow screens: the label above its bar
    const row = stacked ? 40 : 26;
    const labelWidth = stacked ? 0 : Math.min(Math.round(width * 0.46), 300);
    const valueWidth = 52;
    const barStart = stacked ? 0 : labelWidth + 10;
    const barSpace = Math.max(width - barStart - valueWidth, 20);
    const scale = shapMax > 0 ? barSpace / shapMax : 0;
    const height = contributions.length * row + 4;
    const chart = svg("svg", { width, height, viewBox: "0 0 " + width + " " + height, role: "img",
      "aria-label": "Rationale for " + stepLabel + ": " + contributions.map(
        (c) => c.text + " " + (c.shap >= 0 ? "pushes up " : "pushes down ") + fmt(Math.abs(c.shap), 2)).join("; "),
      "data-testid": "rationale-chart", class: "chart" });
    contributions.forEach((c, i) => {
      const top = i * row + 2;
      const barY = stacked ? top + 18 : top + 4;
      const barH = stacked ? 14 : 16;
      const up = c.shap >= 0;
      const labelText = truncate(c.text, stacked ? Math.floor(width / 7) : Math.floor(labelWidth / 6.6));
      const label = svg("text", stacked
        ? { x: 0, y: top + 12, class: "bar-label", "text-anchor": "start" }
        : { x: labelWidth, y: barY + 12, class: "bar-label", "text-anchor": "end" }, labelText);
      label.append(svg("title", {}, c.text));
      chart.append(label);
      const length = Math.max(Math.abs(c.shap) * scale, 1.5);
      const bar = svg("rect", { x: barStart, y: barY, width: length, height: barH, rx: 2,
        class: "bar " + (up ? "up" : "down"), "data-testid": "rationale-bar", "data-feature": c.feature,
        "data-shap": c.shap });
      bar.append(svg("title", {}, c.text + ": " + (up ? "pushes this step up by " : "pushes this step down by ") +
        fmt(Math.abs(c.shap), 3)));
      chart.append(bar);
      chart.append(svg("text", { x: barStart + length + 6, y: barY + barH - 3, class: "bar-value" },
        (up ? "+" : "−") + fmt(Math.abs(c.shap), 2)));
    });
    holder.append(chart);
  }

  function truncate(text, max) {
    return text.length <= max ? text : text.slice(0, Math.max(max - 1, 1)) + "…";
  }

  // ------------------------------------------------------------------ feedback

  function feedbackControls(answer, s) {
    const status = el("p", { className: "feedback-status", "data-testid": "feedback-status", role: "status" });
    const accept = el("button", { type: "button", className: "primary small-button", "data-testid": "accept",
      text: "Accept" });
    const override = el("button", { type: "button", className: "secondary small-button", "data-testid": "override",
      text: "Override", "aria-expanded": "false" });
    const reasonId = "reason-" + s.id;
    const reason = el("input", { id: reasonId, type: "text", maxlength: 500, required: true, autocomplete: "off",
      "data-testid": "override-reason", placeholder: "e.g. patient prefers psychotherapy" });
    const submit = el("button", { type: "submit", className: "primary small-button",
      "data-testid": "override-submit", text: "Record override" });
    const cancel = el("button", { type: "button", className: "secondary small-button", text: "Cancel" });
    const form = el("form", { className: "override-form", "data-testid": "override-form", hidden: true },
      el("label", { for: reasonId, text: "Reason for not following this step" }),
      el("div", { className: "inline" }, reason, submit, cancel));
    const box = el("div", { className: "feedback" }, el("div", { className: "inline" }, accept, override), form, status);

    const done = (outcome) => {
      accept.disabled = true;
      override.disabled = true;
      form.hidden = true;
      override.setAttribute("aria-expanded", "false");
      status.className = "feedback-status ok";
      status.textContent = (outcome === "accepted" ? "Accepted" : "Overridden") + ": recorded in the audit trail.";
    };
    const send = async (outcome, overrideReason) => {
      status.className = "feedback-status";
      status.textContent = "Recording…";
      const body = { audit_id: answer.audit_id, suggestion_id: s.id, action: s.action, outcome };
      if (overrideReason) body.override_reason = overrideReason;
      try {
        await api("POST", "/v1/feedback", body);
        done(outcome);
      } catch (err) {
        status.className = "feedback-status failed";
        status.textContent = "Not recorded: " + err.message;
      }
    };
    accept.addEventListener("click", () => send("accepted"));
    override.addEventListener("click", () => {
      form.hidden = !form.hidden;
      override.setAttribute("aria-expanded", String(!form.hidden));
      if (!form.hidden) reason.focus();
    });
    cancel.addEventListener("click", () => {
      form.hidden = true;
      override.setAttribute("aria-expanded", "false");
      override.focus();
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = reason.value.trim();
      if (!text) {
        status.className = "feedback-status failed";
        status.textContent = "Please give a short reason for the override.";
        reason.focus();
        return;
      }
      send("overridden", text);
    });
    return box;
  }

  // ------------------------------------------------------------------ blocked, imputed

  function renderBlocked(blocked) {
    const list = $("blocked");
    list.textContent = "";
    if (!blocked.length) {
      list.append(el("li", { className: "muted", text: "No step is blocked for this patient." }));
      return;
    }
    // steps blocked by the same rules are listed together (item 9 blocks all but one step, by one rule)
    const groups = new Map();
    for (const b of blocked) {
      const key = b.rules.map((r) => r.name).join(" ");
      if (!groups.has(key)) groups.set(key, { rules: b.rules, steps: [] });
      groups.get(key).steps.push(b);
    }
    for (const { rules, steps } of groups.values()) {
      const names = el("ul", { className: "blocked-steps", "aria-label": "blocked steps" });
      for (const b of steps) names.append(el("li", { "data-action": b.action, "data-testid": "blocked-step", text: b.label }));
      const because = el("ul", { className: "rules", "aria-label": "because" });
      for (const r of rules) {
        because.append(el("li", { className: r.critical ? "critical" : "", "data-testid": "blocked-rule",
          "data-rule": r.name, text: r.description }));
      }
      list.append(el("li", { className: "blocked-group" }, names, because));
    }
  }

  function renderImputed(imputed) {
    const list = $("imputed");
    list.textContent = "";
    if (!imputed.length) {
      list.append(el("li", { className: "muted", text: "Nothing assumed: every feature was given." }));
      return;
    }
    for (const i of imputed) {
      list.append(el("li", { "data-feature": i.feature },
        "assumed: ", el("strong", { text: labelOf(i.feature) + " = " + fmtValue(i.value) }), " (" + i.reason + ")"));
    }
  }

  // ------------------------------------------------------------------ start

  async function start() {
    initToken();
    $("patient-form").addEventListener("submit", recommend);
    $("clear").addEventListener("click", () => {
      $("example").value = "";
      $("example-help").textContent = "";
      $("patient-id").value = "";
      fillForm({});
      clearError();
    });
    let resizeQueued = false;
    window.addEventListener("resize", () => {
      if (resizeQueued) return;
      resizeQueued = true;
      window.requestAnimationFrame(() => {
        resizeQueued = false;
        redrawAll();
      });
    });
    try {
      const [openapi, examples] = await Promise.all([
        api("GET", "/openapi.json"),
        api("GET", "/static/examples.json").catch(() => ({ patients: [] })),
      ]);
      buildForm(featureSchema(openapi));
      initExamples(examples);
    } catch (err) {
      $("features").textContent = "";
      showError("Could not load the patient feature list from /openapi.json: " + err.message);
    }
    document.body.setAttribute("data-ready", "true");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
