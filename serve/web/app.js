// motionserve web page: plain JavaScript, no framework, no build step, nothing loaded from
// elsewhere. It calls only the public /v1 API (sending the API key when one is typed in) and
// reads what the server offers from its /openapi.json: presets, output bounds, motion styles
// and their parameters, and whether motion previews and reference images are available.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "motionserve.apiKey";
  const TERMINAL = new Set(["done", "failed", "cancelled"]);
  const POLL_MS = 500;
  const ESTIMATE_DELAY_MS = 300;

  const state = {
    styles: {}, // name -> {params: {name: schema}, required: [..]}
    features: { previews: false, reference: false },
    meta: null, // the chosen video's {duration, width, height}, read by the browser
    metaFor: null, // the File the metadata belongs to
    estimateSeq: 0,
    estimateTimer: null,
    job: null, // {id, timer}
    preview: null, // {id, timer}
    resultUrl: null,
    previewUrl: null,
    anchorUrl: null,
    styleCounter: 0,
  };

  // ------------------------------------------------------------------ the API, with the key

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function apiKey() {
    return $("api-key").value.trim();
  }

  function withKey(headers = {}) {
    const key = apiKey();
    return key ? { ...headers, "X-API-Key": key } : { ...headers };
  }

  function errorFromBody(status, statusText, body) {
    const error = body && typeof body === "object" ? body.error : null;
    if (error && error.message) return new ApiError(status, error.code || "", error.message);
    return new ApiError(status, `http_${status}`, statusText || `HTTP ${status}`);
  }

  async function call(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: withKey(options.headers) });
    } catch (err) {
      throw new ApiError(0, "network_error", `the server could not be reached (${err.message})`);
    }
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
      throw errorFromBody(response.status, response.statusText, body);
    }
    return response;
  }

  async function callJson(path, options) {
    return (await call(path, options)).json();
  }

  // XMLHttpRequest for uploads: fetch cannot report upload progress.
  function upload(path, form, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      const key = apiKey();
      if (key) xhr.setRequestHeader("X-API-Key", key);
      xhr.upload.onprogress = (event) => {
        if (event.lengthComputable) onProgress(event.loaded / event.total);
      };
      xhr.onload = () => {
        let body = null;
        try {
          body = JSON.parse(xhr.responseText);
        } catch (_) {
          body = null;
        }
        if (xhr.status >= 200 && xhr.status < 300) resolve(body);
        else reject(errorFromBody(xhr.status, xhr.statusText, body));
      };
      xhr.onerror = () => reject(new ApiError(0, "network_error", "the server could not be reached"));
      xhr.send(form);
    });
  }

  function describe(err) {
    return err.code && !err.code.startsWith("http_") ? `${err.message} (${err.code})` : err.message;
  }

  function showError(element, err) {
    if (!err) {
      element.hidden = true;
      element.textContent = "";
      delete element.dataset.code;
      return;
    }
    element.textContent = typeof err === "string" ? err : describe(err);
    element.dataset.code = err.code || "";
    element.hidden = false;
  }

  // ------------------------------------------------------------------ what the server offers

  function refName(ref) {
    return typeof ref === "string" ? ref.split("/").pop() : null;
  }

  function numericBranch(schema) {
    if (!schema) return {};
    if (schema.anyOf) return schema.anyOf.find((s) => s.type === "number" || s.type === "integer") || {};
    return schema;
  }

  function configure(doc) {
    const schemas = (doc.components && doc.components.schemas) || {};
    const request = schemas.JobRequest || { properties: {} };

    // Presets.
    const presetSchema = request.properties.preset || {};
    const branches = presetSchema.anyOf || [presetSchema];
    const presets = (branches.find((s) => Array.isArray(s.enum)) || { enum: [] }).enum;
    const select = $("preset");
    for (const name of presets) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      select.append(option);
    }

    // Output bounds.
    const output = (schemas.OutputSpec && schemas.OutputSpec.properties) || {};
    for (const [field, id] of [["width", "out-width"], ["height", "out-height"], ["fps", "out-fps"]]) {
      const bounds = numericBranch(output[field]);
      if (bounds.minimum !== undefined) $(id).min = bounds.minimum;
      if (bounds.maximum !== undefined) $(id).max = bounds.maximum;
      if (output[field] && output[field].description) $(id).title = output[field].description;
    }

    // Motion styles and their parameters.
    const union = schemas.MotionStyle;
    const refs = union ? union.oneOf || union.anyOf || [] : [];
    for (const ref of refs) {
      const schema = schemas[refName(ref.$ref)];
      if (!schema || !schema.properties || !schema.properties.name) continue;
      const name = schema.properties.name.const || schema.properties.name.default;
      const params = {};
      for (const [param, spec] of Object.entries(schema.properties)) {
        if (param !== "name") params[param] = spec;
      }
      state.styles[name] = { params, required: schema.required || [] };
    }
    if (!Object.keys(state.styles).length) {
      // An older server: names only, from the styles' documented pattern.
      const description = (request.properties.styles && request.properties.styles.items || {}).description || "";
      const match = description.match(/one of (.*)$/);
      for (const name of (match ? match[1] : "smooth").split(/,\s*/)) {
        state.styles[name.trim()] = { params: {}, required: [] };
      }
    }
    const adder = $("add-style-name");
    for (const name of Object.keys(state.styles)) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      adder.append(option);
    }

    // Features other parts of the server may or may not have.
    const paths = doc.paths || {};
    state.features.previews = Boolean(paths["/v1/previews"] && paths["/v1/previews"].post);
    const submit = paths["/v1/jobs"] && paths["/v1/jobs"].post;
    const multipart = submit && submit.requestBody && submit.requestBody.content
      && submit.requestBody.content["multipart/form-data"];
    const fields = (multipart && multipart.schema && multipart.schema.properties) || {};
    state.features.reference = Boolean(fields.reference);
    $("reference-field").hidden = !state.features.reference;
    $("preview-button").hidden = !state.features.previews;
    $("anchor-frame-field").hidden = !state.features.previews;
  }

  // ------------------------------------------------------------------ motion styles

  function inputFor(id, spec) {
    let input;
    if (Array.isArray(spec.enum)) {
      input = document.createElement("select");
      for (const value of spec.enum) {
        const option = document.createElement("option");
        option.value = String(value);
        option.textContent = String(value);
        input.append(option);
      }
    } else if (spec.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
    } else {
      input = document.createElement("input");
      if (spec.type === "number" || spec.type === "integer") {
        input.type = "number";
        input.step = spec.type === "integer" ? "1" : "any";
        input.inputMode = spec.type === "integer" ? "numeric" : "decimal";
        if (spec.minimum !== undefined) input.min = spec.minimum;
        if (spec.maximum !== undefined) input.max = spec.maximum;
      } else {
        input.type = "text";
      }
    }
    input.id = id;
    if (spec.default !== undefined) {
      if (input.type === "checkbox") input.checked = Boolean(spec.default);
      else input.value = String(spec.default);
    }
    return input;
  }

  function addStyle(name) {
    const style = state.styles[name];
    if (!style) return null;
    const n = ++state.styleCounter;
    const item = document.createElement("li");
    item.dataset.style = name;
    const head = document.createElement("div");
    head.className = "style-head";
    const title = document.createElement("strong");
    title.id = `style-${n}-title`;
    title.textContent = name;
    const up = document.createElement("button");
    up.type = "button";
    up.className = "small";
    up.textContent = "Move up";
    up.setAttribute("aria-label", `Move ${name} up`);
    up.addEventListener("click", () => {
      if (item.previousElementSibling) item.parentNode.insertBefore(item, item.previousElementSibling);
      up.focus();
      scheduleEstimate();
    });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "small";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove ${name}`);
    remove.addEventListener("click", () => {
      item.remove();
      $("add-style-name").focus();
      scheduleEstimate();
    });
    head.append(title, up, remove);
    item.append(head);

    const params = Object.entries(style.params);
    if (params.length) {
      const details = document.createElement("details");
      details.open = params.length <= 2;
      const summary = document.createElement("summary");
      summary.textContent = `${name} parameters`;
      details.append(summary);
      for (const [param, spec] of params) {
        const field = document.createElement("div");
        field.className = "field";
        const id = `style-${n}-${param}`;
        const label = document.createElement("label");
        label.htmlFor = id;
        label.textContent = spec.title || param;
        const input = inputFor(id, spec);
        input.dataset.param = param;
        if (style.required.includes(param)) input.required = true;
        field.append(label, input);
        if (spec.description) {
          const help = document.createElement("p");
          help.className = "help";
          help.id = `${id}-help`;
          help.textContent = spec.description;
          input.setAttribute("aria-describedby", help.id);
          field.append(help);
        }
        details.append(field);
      }
      item.append(details);
    }
    $("styles").append(item);
    return item;
  }

  function sameValue(text, spec) {
    if (spec.default === undefined) return false;
    if (spec.type === "number" || spec.type === "integer") return Number(text) === Number(spec.default);
    return text === String(spec.default);
  }

  // The text the API takes: `name`, or `name:key=value,...` with the values changed from their
  // defaults (and the required ones).
  function styleText(item) {
    const name = item.dataset.style;
    const style = state.styles[name];
    const changed = [];
    for (const input of item.querySelectorAll("[data-param]")) {
      const param = input.dataset.param;
      const spec = style.params[param];
      const value = input.type === "checkbox" ? String(input.checked) : input.value.trim();
      if (value === "" && !style.required.includes(param)) continue;
      if (value === "" || !sameValue(value, spec)) changed.push(`${param}=${value}`);
    }
    return changed.length ? `${name}:${changed.join(",")}` : name;
  }

  // ------------------------------------------------------------------ the request

  class FormProblem extends Error {}

  function numberOrNull(id, integer) {
    const text = $(id).value.trim();
    if (text === "") return null;
    const value = Number(text);
    if (!Number.isFinite(value)) throw new FormProblem(`${$(id).labels[0].textContent}: not a number`);
    return integer ? Math.round(value) : value;
  }

  function buildRequest(forEstimate) {
    const prompt = $("prompt").value.trim();
    const request = {
      // The estimate does not depend on the prompt; the API requires one.
      prompt: prompt || (forEstimate ? "estimate" : ""),
      styles: [...$("styles").children].map(styleText),
    };
    const negative = $("negative-prompt").value.trim();
    if (negative) request.negative_prompt = negative;
    if ($("preset").value) request.preset = $("preset").value;
    const seed = numberOrNull("seed", true);
    if (seed !== null) request.seed = seed;
    const output = { keep_audio: $("keep-audio").checked };
    for (const [field, id, integer] of [["width", "out-width", true], ["height", "out-height", true], ["fps", "out-fps", false]]) {
      const value = numberOrNull(id, integer);
      if (value !== null) output[field] = value;
    }
    request.output = output;
    const overrides = $("overrides").value.trim();
    if (overrides) {
      let parsed;
      try {
        parsed = JSON.parse(overrides);
      } catch (err) {
        throw new FormProblem(`Overrides: not valid JSON (${err.message})`);
      }
      if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
        throw new FormProblem("Overrides: write a JSON object, e.g. {\"steps\": 12}");
      }
      request.overrides = parsed;
    }
    return request;
  }

  function formData(request) {
    const form = new FormData();
    form.append("video", $("video").files[0]);
    // A plain text field (a Blob would arrive as a file).
    form.append("request", JSON.stringify(request));
    if (state.features.reference && $("reference").files.length) {
      form.append("reference", $("reference").files[0]);
    }
    return form;
  }

  // ------------------------------------------------------------------ the estimate

  function readMetadata(file) {
    return new Promise((resolve) => {
      const url = URL.createObjectURL(file);
      const video = document.createElement("video");
      let settled = false;
      const finish = (meta) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        video.removeAttribute("src");
        video.load();
        URL.revokeObjectURL(url);
        resolve(meta);
      };
      const timer = setTimeout(() => finish(null), 15000);
      video.preload = "metadata";
      video.muted = true;
      video.onloadedmetadata = () => {
        const ok = video.videoWidth > 0 && Number.isFinite(video.duration) && video.duration > 0;
        finish(ok ? { duration: video.duration, width: video.videoWidth, height: video.videoHeight } : null);
      };
      video.onerror = () => finish(null);
      video.src = url;
    });
  }

  function fixed(value, digits) {
    return typeof value === "number" ? value.toFixed(digits) : "-";
  }

  function dollars(value) {
    if (typeof value !== "number") return "-";
    if (value === 0) return "$0";
    return value < 0.001 ? `$${value.toExponential(2)}` : `$${value.toFixed(4)}`;
  }

  function unitsOf(workUnits) {
    if (typeof workUnits === "number") return workUnits;
    if (!workUnits || typeof workUnits !== "object") return null;
    return Object.entries(workUnits)
      .filter(([key, value]) => key.endsWith("_units") && typeof value === "number")
      .reduce((sum, [, value]) => sum + value, 0);
  }

  function definitionList(rows) {
    const list = document.createElement("dl");
    for (const [term, value] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      list.append(dt, dd);
    }
    return list;
  }

  function estimateSide(side) {
    return `${side.generated_frames} frames generated, ${fixed(unitsOf(side.work_units), 1)} work units, `
      + `${fixed(side.gpu_seconds, 1)} GPU s, ${dollars(side.dollars.spot)} spot / `
      + `${dollars(side.dollars.on_demand)} on-demand`;
  }

  function renderEstimate(box, estimate, meta) {
    box.replaceChildren();
    const rows = [];
    if (meta) rows.push(["Input", `${meta.width}x${meta.height}, ${meta.duration.toFixed(1)} s`]);
    rows.push(["This plan", estimateSide(estimate.plan)]);
    rows.push(["Naive run", estimateSide(estimate.naive)]);
    rows.push(["Saving", `naive / plan: x${fixed(estimate.ratio, 1)} work units (tier ${estimate.tier})`]);
    box.append(definitionList(rows));
    if (Array.isArray(estimate.plan_explained)) {
      const list = document.createElement("ul");
      list.className = "help";
      for (const line of estimate.plan_explained) {
        const item = document.createElement("li");
        item.textContent = line;
        list.append(item);
      }
      box.append(list);
    }
    for (const note of estimate.notes || []) {
      const p = document.createElement("p");
      p.className = "help";
      p.textContent = note;
      box.append(p);
    }
  }

  function estimateMessage(text, stateName, isError) {
    const box = $("estimate");
    box.replaceChildren();
    const p = document.createElement("p");
    p.className = isError ? "error" : "help";
    p.textContent = text;
    box.append(p);
    box.dataset.state = stateName;
  }

  function scheduleEstimate() {
    clearTimeout(state.estimateTimer);
    state.estimateTimer = setTimeout(runEstimate, ESTIMATE_DELAY_MS);
  }

  async function runEstimate() {
    const seq = ++state.estimateSeq;
    const file = $("video").files[0];
    if (!file) {
      estimateMessage("Choose a video to see what the edit will cost.", "empty", false);
      return;
    }
    if (state.metaFor !== file) {
      estimateMessage("Reading the video's length and size...", "loading", false);
      const meta = await readMetadata(file);
      if (seq !== state.estimateSeq) return;
      state.meta = meta;
      state.metaFor = file;
    }
    if (!state.meta) {
      estimateMessage("This browser cannot read the video's length and size, so there is no "
        + "estimate; the server still checks the file when you submit.", "unavailable", false);
      return;
    }
    let request;
    try {
      request = buildRequest(true);
    } catch (err) {
      estimateMessage(err.message, "error", true);
      return;
    }
    const body = {
      duration_s: state.meta.duration,
      width: state.meta.width,
      height: state.meta.height,
      request,
    };
    $("estimate").dataset.state = "loading";
    try {
      const estimate = await callJson("v1/estimate", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (seq !== state.estimateSeq) return;
      renderEstimate($("estimate"), estimate, state.meta);
      $("estimate").dataset.state = "ready";
    } catch (err) {
      if (seq !== state.estimateSeq) return;
      estimateMessage(`The server would refuse this request: ${describe(err)}`, "error", true);
    }
  }

  // ------------------------------------------------------------------ progress and polling

  function renderProgress(list, progress) {
    for (const [stage, { done, total }] of Object.entries(progress || {})) {
      let item = list.querySelector(`li[data-stage="${CSS.escape(stage)}"]`);
      if (!item) {
        item = document.createElement("li");
        item.dataset.stage = stage;
        const name = document.createElement("span");
        name.id = `${list.id}-${stage}`;
        name.textContent = stage;
        const bar = document.createElement("progress");
        bar.setAttribute("aria-labelledby", name.id);
        const count = document.createElement("span");
        count.className = "count";
        item.append(name, bar, count);
        list.append(item);
      }
      const bar = item.querySelector("progress");
      if (total > 0) {
        bar.max = total;
        bar.value = done;
      } else {
        bar.removeAttribute("value"); // indeterminate: the total is not known yet
      }
      item.querySelector(".count").textContent = total > 0 ? `${done}/${total}` : "waiting";
    }
  }

  function renderState(element, status) {
    element.dataset.state = status.state;
    element.textContent = status.cancel_requested ? `${status.state} (cancel requested)` : status.state;
  }

  function trackerUi(kind) {
    return kind === "job"
      ? { state: $("job-state"), progress: $("job-progress"), error: $("job-error"), cancel: $("job-cancel"), path: "v1/jobs" }
      : { state: $("preview-state"), progress: $("preview-progress"), error: $("preview-error"), cancel: $("preview-cancel"), path: "v1/previews" };
  }

  // Shows a status; at a terminal state stops following and shows what came of it.
  function show(kind, tracker, status) {
    if (state[kind] !== tracker || tracker.finished) return;
    const ui = trackerUi(kind);
    renderState(ui.state, status);
    renderProgress(ui.progress, status.progress);
    if (!TERMINAL.has(status.state)) return;
    tracker.finished = true;
    clearTimeout(tracker.timer);
    ui.cancel.disabled = true;
    if (status.state === "failed" && status.error) {
      showError(ui.error, new ApiError(0, status.error.code || "", status.error.message || "failed"));
    }
    if (kind === "job") jobFinished(tracker.id, status);
    else previewFinished(tracker.id, status);
  }

  function follow(kind, id) {
    const tracker = { id, timer: null, finished: false };
    const ui = trackerUi(kind);
    const previous = state[kind];
    if (previous) clearTimeout(previous.timer);
    state[kind] = tracker;
    ui.progress.replaceChildren();
    showError(ui.error, null);
    ui.cancel.disabled = false;
    ui.state.dataset.state = "queued";
    ui.state.textContent = "queued";

    const poll = async () => {
      if (state[kind] !== tracker || tracker.finished) return;
      try {
        const status = await callJson(`${ui.path}/${encodeURIComponent(id)}`);
        showError(ui.error, null);
        show(kind, tracker, status);
      } catch (err) {
        if (state[kind] !== tracker) return;
        showError(ui.error, err);
        if (err.status === 401 || err.status === 404) {
          ui.cancel.disabled = true;
          return; // nothing to poll: a key changed, or the job is not this tenant's
        }
      }
      if (state[kind] === tracker && !tracker.finished) tracker.timer = setTimeout(poll, POLL_MS);
    };
    poll();
  }

  async function cancel(kind) {
    const tracker = state[kind];
    if (!tracker || tracker.finished) return;
    const ui = trackerUi(kind);
    ui.cancel.disabled = true;
    try {
      const status = await callJson(`${ui.path}/${encodeURIComponent(tracker.id)}`, { method: "DELETE" });
      // 200: stopped (or already finished); 202: another replica stops it, polling shows when.
      show(kind, tracker, status);
    } catch (err) {
      showError(ui.error, err);
      if (!tracker.finished) ui.cancel.disabled = false;
    }
  }

  async function fetchBlobUrl(path) {
    const blob = await (await call(path)).blob();
    return URL.createObjectURL(blob);
  }

  async function jobFinished(id, status) {
    if (status.state !== "done") return;
    if (status.report) renderCost(status.report);
    try {
      const url = await fetchBlobUrl(`v1/jobs/${encodeURIComponent(id)}/result`);
      if (!state.job || state.job.id !== id) {
        URL.revokeObjectURL(url);
        return;
      }
      if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
      state.resultUrl = url;
      const video = $("result-video");
      video.src = url;
      const link = $("result-download");
      link.href = url;
      link.download = `${id}.mp4`;
      $("result-section").hidden = false;
    } catch (err) {
      showError($("job-error"), err);
    }
  }

  async function previewFinished(id, status) {
    if (status.state !== "done") return;
    const report = status.report || {};
    const box = $("preview-estimate");
    box.replaceChildren();
    if (report.estimate) {
      const heading = document.createElement("h3");
      heading.textContent = "Estimate of the job";
      const inner = document.createElement("div");
      box.append(heading, inner);
      renderEstimate(inner, report.estimate, state.meta);
    }
    try {
      const url = await fetchBlobUrl(`v1/previews/${encodeURIComponent(id)}/video`);
      if (!state.preview || state.preview.id !== id) {
        URL.revokeObjectURL(url);
        return;
      }
      if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
      state.previewUrl = url;
      $("preview-video").src = url;
      $("preview-figure").hidden = false;
      if (status.anchor_url) {
        const image = await fetchBlobUrl(`v1/previews/${encodeURIComponent(id)}/anchor`);
        if (state.anchorUrl) URL.revokeObjectURL(state.anchorUrl);
        state.anchorUrl = image;
        $("anchor-image").src = image;
        $("anchor-figure").hidden = false;
      }
    } catch (err) {
      showError($("preview-error"), err);
    }
  }

  // ------------------------------------------------------------------ the cost table

  function cell(row, text, header) {
    const element = document.createElement(header ? "th" : "td");
    if (header) element.scope = "row";
    element.textContent = text;
    row.append(element);
  }

  function renderCost(report) {
    const plan = report.plan || { stages: [] };
    const naive = report.naive || { stages: [] };
    const rows = new Map();
    const key = (stage) => `${stage.stage}\u0000${stage.device}`;
    for (const stage of plan.stages || []) rows.set(key(stage), { plan: stage });
    for (const stage of naive.stages || []) {
      const row = rows.get(key(stage)) || {};
      row.naive = stage;
      rows.set(key(stage), row);
    }
    const body = $("cost-table").tBodies[0];
    body.replaceChildren();
    for (const { plan: p, naive: n } of rows.values()) {
      const any = p || n;
      const row = document.createElement("tr");
      cell(row, any.stage, true);
      cell(row, any.device);
      cell(row, p ? String(p.calls) : "-");
      cell(row, p ? String(p.cache_hits) : "-");
      cell(row, p ? fixed(p.seconds, 2) : "-");
      cell(row, p ? dollars(p.dollars && p.dollars.spot) : "-");
      cell(row, n ? fixed(n.seconds, 2) : "-");
      cell(row, n ? dollars(n.dollars && n.dollars.spot) : "-");
      body.append(row);
    }
    const totals = $("cost-totals").tBodies[0];
    totals.replaceChildren();
    for (const [name, side] of [["plan", plan], ["naive", naive]]) {
      const row = document.createElement("tr");
      cell(row, name, true);
      cell(row, String(side.generated_frames ?? "-"));
      cell(row, fixed(unitsOf(side.work_units), 1));
      cell(row, fixed(side.gpu_seconds, 2));
      cell(row, fixed(side.cpu_seconds, 2));
      cell(row, dollars(side.dollars && side.dollars.spot));
      cell(row, dollars(side.dollars && side.dollars.on_demand));
      totals.append(row);
    }
    const ratios = report.ratios || {};
    let summary = `Tier ${report.tier} (${report.hardware}). naive / plan: work units x${fixed(ratios.work_units, 1)}`;
    if (plan.dollars && plan.dollars.spot < 1e-6) {
      summary += "; this run cost less than $0.000001: everything came from the cache.";
    } else {
      summary += `, dollars (spot) x${fixed(ratios.dollars_spot, 1)}.`;
    }
    $("cost-summary").textContent = summary;
    const consistency = report.consistency;
    let line = "";
    if (consistency && consistency.error) line = `Consistency: not measured (${consistency.error}).`;
    else if (consistency && consistency.output) {
      const out = consistency.output;
      line = `Consistency: warp error ${fixed(out.warp_error, 2)} grey levels, seam ratio `
        + `${fixed(out.seam_ratio, 2)} over ${out.boundaries} chunk boundaries (1.0 = no seam).`;
    }
    $("cost-consistency").textContent = line;
    const notes = $("cost-notes");
    notes.replaceChildren();
    for (const note of report.notes || []) {
      const item = document.createElement("li");
      item.textContent = note;
      notes.append(item);
    }
    $("cost-section").hidden = false;
  }

  // ------------------------------------------------------------------ submitting

  async function send(kind) {
    const form = $("job-form");
    if (!form.reportValidity()) return;
    showError($("form-error"), null);
    let request;
    try {
      request = buildRequest(false);
      if (kind === "preview" && $("anchor-frame").checked) request.frames = "anchor";
    } catch (err) {
      showError($("form-error"), err.message);
      return;
    }
    const buttons = [$("submit-button"), $("preview-button")];
    buttons.forEach((button) => { button.disabled = true; });
    const status = $("upload-status");
    status.textContent = "Uploading...";
    try {
      const path = kind === "job" ? "v1/jobs" : "v1/previews";
      const accepted = await upload(path, formData(request), (fraction) => {
        status.textContent = `Uploading: ${Math.round(fraction * 100)}%`;
      });
      status.textContent = "";
      if (kind === "job") {
        $("result-section").hidden = true;
        $("cost-section").hidden = true;
        $("job-id").textContent = `job ${accepted.job_id}`;
        $("job-section").hidden = false;
        follow("job", accepted.job_id);
      } else {
        $("preview-figure").hidden = true;
        $("anchor-figure").hidden = true;
        $("preview-estimate").replaceChildren();
        $("preview-id").textContent = `preview ${accepted.preview_id}`;
        $("preview-section").hidden = false;
        follow("preview", accepted.preview_id);
      }
    } catch (err) {
      status.textContent = "";
      showError($("form-error"), err);
      $("form-error").focus();
    } finally {
      buttons.forEach((button) => { button.disabled = false; });
    }
  }

  // ------------------------------------------------------------------ start

  function restoreKey() {
    const saved = localStorage.getItem(KEY_STORAGE);
    if (saved) {
      $("api-key").value = saved;
      $("remember-key").checked = true;
    }
  }

  function saveKey() {
    if ($("remember-key").checked && apiKey()) localStorage.setItem(KEY_STORAGE, apiKey());
    else localStorage.removeItem(KEY_STORAGE);
  }

  async function start() {
    restoreKey();
    $("form-error").tabIndex = -1;
    $("api-key").addEventListener("change", () => {
      saveKey();
      scheduleEstimate();
    });
    $("remember-key").addEventListener("change", saveKey);
    const form = $("job-form");
    form.addEventListener("input", scheduleEstimate);
    form.addEventListener("change", scheduleEstimate);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      send("job");
    });
    $("preview-button").addEventListener("click", () => send("preview"));
    $("job-cancel").addEventListener("click", () => cancel("job"));
    $("preview-cancel").addEventListener("click", () => cancel("preview"));
    $("add-style").addEventListener("click", () => {
      const item = addStyle($("add-style-name").value);
      const first = item && item.querySelector("input, select");
      if (first) first.focus();
      scheduleEstimate();
    });

    try {
      const response = await fetch("openapi.json");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      configure(await response.json());
    } catch (err) {
      $("api-status").textContent = `Could not read the server's API description (${err.message}); reload to try again.`;
      $("api-status").className = "error";
      return;
    }
    if (state.styles.smooth) addStyle("smooth");
    document.body.dataset.ready = "true";
  }

  start();
})();
