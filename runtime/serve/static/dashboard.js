// layerline's stage 0 dashboard: polls the public endpoints, changes the draft through
// /v1/draft, and chats through /v1/chat/completions. No libraries: stage 0 may be offline.
"use strict";

const POLL_MS = 1000;
const RATE_WINDOW_MS = 2000; // tokens/s is measured over this much recent time
const SETTING_KEYS = ["strategy", "type", "draft_model", "window_policy", "initial_window", "min_window",
                      "max_window"];

const $ = (id) => document.getElementById(id);
const tokenSamples = []; // [time ms, completion tokens total]
let formFilled = false;
let awaitingDraft = null; // the draft a PUT is loading, until it switches or fails
const chatHistory = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["content-type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const text = await response.text();
  let data = text;
  try { data = JSON.parse(text); } catch (_) { /* /metrics is text */ }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || `${response.status} ${text}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return { status: response.status, data };
}

// Prometheus text format -> {name: [{labels, value}]}
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[key] = value;
    }
    (out[match[1]] = out[match[1]] || []).push({ labels, value: parseFloat(match[3]) });
  }
  return out;
}

function metricSum(metrics, name, where = {}) {
  return (metrics[name] || [])
    .filter((s) => Object.entries(where).every(([k, v]) => s.labels[k] === v))
    .reduce((total, s) => total + s.value, 0);
}

function formatBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}

function formatUptime(seconds) {
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return `up ${h ? `${h} h ` : ""}${m} min ${s % 60} s`;
}

function progressCell(stage) {
  if (stage.bytes_total === undefined) return el("span", { class: "muted" }, "local");
  const total = stage.bytes_total || 0, present = stage.bytes_present || 0;
  const share = total ? present / total : (stage.state === "ready" ? 1 : 0);
  const bar = el("div", { class: "progress", title: `${Math.round(share * 100)} %` },
                 el("span", { style: `width: ${(share * 100).toFixed(1)}%` }));
  let text = total ? `${formatBytes(present)} of ${formatBytes(total)}` : "";
  if (stage.state === "preparing" && stage.bytes_per_s) {
    text += ` · ${formatBytes(stage.bytes_per_s)}/s`;
    if (stage.eta_s !== null && stage.eta_s !== undefined) text += ` · ${Math.ceil(stage.eta_s)} s left`;
  }
  const sources = Object.entries(stage.sources || {})
    .map(([source, n]) => `${source}: ${formatBytes(n)}`).join(", ");
  const label = el("span", { class: "progress-label", title: sources ? `from ${sources}` : "" }, text);
  return el("div", {}, bar, label);
}

function renderStatus(status) {
  $("model").textContent = status.model;
  const health = $("health");
  health.dataset.state = status.ready ? "ready" : "unavailable";
  health.textContent = status.ready ? "ready" : "not ready";
  $("uptime").textContent = formatUptime(status.uptime_s);
  $("package").textContent = status.package;
  $("layers").textContent = `${status.layers} in ${status.stages.length} stages`;
  $("wire").textContent = status.wire_dtype;
  $("context").textContent = `${status.context_length} tokens`;
  $("run").textContent = `${status.run_id} (term ${status.term})`;
  // The split's source and why (measured times, free memory, or --split); per stage its numbers.
  const placement = status.placement;
  $("placement").textContent = placement ? placement.reason : "planning…";
  const planned = placement ? placement.stages : [];
  const rows = status.stages.map((stage, i) => {
    const state = el("span", { class: "badge", dataset: { state: stage.state } }, stage.state);
    const stateCell = el("td", {}, state);
    if (stage.error) stateCell.append(el("div", { class: "muted" }, stage.error));
    const plan = planned[i] || {};
    const layerMs = plan.layer_ms != null ? `${plan.layer_ms.toFixed(2)} (${plan.weight_format})` : "–";
    const passMs = plan.stage_ms != null ? plan.stage_ms.toFixed(1) : "–";
    const memory = plan.memory_free_bytes != null
      ? `${formatBytes(plan.memory_free_bytes)}${plan.max_layers != null ? ` (fits ${plan.max_layers} layers)` : ""}`
      : "–";
    return el("tr", { dataset: { stage: String(stage.stage) } },
              el("td", {}, String(stage.stage)), el("td", {}, el("code", {}, stage.endpoint)),
              el("td", { class: "layers" }, `${stage.layers[0]}..${stage.layers[1]}`),
              el("td", { class: "layer-ms" }, layerMs), el("td", { class: "pass-ms" }, passMs),
              el("td", { class: "memory" }, memory),
              stateCell, el("td", {}, progressCell(stage)));
  });
  document.querySelector("#stages tbody").replaceChildren(...rows);
}

function renderMetrics(metrics) {
  const now = Date.now();
  tokenSamples.push([now, metricSum(metrics, "layerline_completion_tokens_total")]);
  while (tokenSamples.length > 2 && now - tokenSamples[1][0] >= RATE_WINDOW_MS) tokenSamples.shift();
  const [t0, n0] = tokenSamples[0], [t1, n1] = tokenSamples[tokenSamples.length - 1];
  $("tok-s").textContent = t1 > t0 ? ((n1 - n0) / ((t1 - t0) / 1000)).toFixed(1) : "0";
  const drafted = metricSum(metrics, "layerline_speculative_drafted_tokens_total");
  const passes = metricSum(metrics, "layerline_speculative_target_passes_total");
  $("accept-rate").textContent = drafted
    ? `${(100 * metricSum(metrics, "layerline_speculative_accept_rate")).toFixed(1)} %` : "–";
  $("tokens-per-pass").textContent = passes
    ? metricSum(metrics, "layerline_speculative_tokens_per_pass").toFixed(2) : "–";
  const ok = metricSum(metrics, "layerline_requests_total", { status: "ok" });
  const failed = metricSum(metrics, "layerline_requests_total", { status: "error" });
  $("requests").textContent = String(ok + failed);
  const speculative = metricSum(metrics, "layerline_speculative_requests_total", { mode: "speculative" });
  const plain = metricSum(metrics, "layerline_speculative_requests_total", { mode: "plain" });
  $("requests-detail").textContent =
    `${ok} ok, ${failed} failed; ${speculative} speculative, ${plain} plain (since start)`;
}

function renderDraft(spec) {
  const indicator = $("spec-indicator");
  indicator.dataset.active = String(spec.active);
  indicator.textContent = spec.active ? "active" : "inactive";
  $("spec-reason").textContent = spec.active
    ? `drafting with ${spec.draft_model || spec.type} (${spec.window_policy} window)`
    : spec.inactive_reason || "";
  const pending = $("pending");
  const next = spec.pending_draft || spec.failed_draft;
  pending.hidden = !next;
  if (next) {
    pending.dataset.state = next.state;
    pending.textContent = next.state === "failed"
      ? `draft ${next.reference} failed, the settings above stay: ${next.reason}`
      : `loading draft ${next.reference}… requests use the settings above until it is ready`;
  }
  if (awaitingDraft && !spec.pending_draft) {
    if (spec.failed_draft) formMessage(`draft ${awaitingDraft} failed: ${spec.failed_draft.reason}`, "error");
    else formMessage(`now drafting with ${awaitingDraft}`, "ok");
    awaitingDraft = null;
  }
  const rows = [["enabled", spec.enabled], ...SETTING_KEYS.map((k) => [k, spec[k]])].map(([key, value]) =>
    el("tr", {}, el("td", {}, key), el("td", {}, el("code", {}, value === null ? "–" : String(value))),
       el("td", { class: "muted" }, spec.sources[key] || "")));
  const draft = spec.draft;
  rows.push(el("tr", {}, el("td", {}, "draft state"),
                el("td", {}, el("span", { class: "badge", dataset: { state: draft.state } }, draft.state)),
                el("td", { class: "muted" }, draft.reason || (draft.load_seconds !== null
                  ? `loaded in ${draft.load_seconds} s` : ""))));
  document.querySelector("#spec-settings tbody").replaceChildren(...rows);
  if (!formFilled) fillForm(spec);
}

function fillForm(spec) {
  $("draft-model").value = spec.draft_model || "";
  $("window-policy").value = spec.window_policy;
  $("initial-window").value = spec.initial_window;
  $("min-window").value = spec.min_window;
  $("max-window").value = spec.max_window;
  formFilled = true;
}

function showBanner(text) {
  const banner = $("banner");
  banner.hidden = !text;
  banner.textContent = text || "";
}

async function refresh() {
  const [status, metrics, draft] = await Promise.allSettled([
    api("GET", "/v1/status"), api("GET", "/metrics"), api("GET", "/v1/draft")]);
  if (status.status === "fulfilled") renderStatus(status.value.data);
  else {
    $("health").dataset.state = "unavailable";
    $("health").textContent = "unreachable";
  }
  if (metrics.status === "fulfilled") renderMetrics(parseMetrics(metrics.value.data));
  if (draft.status === "fulfilled") {
    renderDraft(draft.value.data);
    showBanner("");
  } else if (draft.reason.status === 401) {
    showBanner("Signed out of the draft API: reload the page to sign in with the admin token.");
  }
}

function formMessage(text, kind) {
  const message = $("form-message");
  message.textContent = text;
  message.dataset.kind = kind;
}

async function setDraft(event) {
  event.preventDefault();
  const body = { draft_model: $("draft-model").value.trim(), window_policy: $("window-policy").value };
  for (const [key, id] of [["initial_window", "initial-window"], ["min_window", "min-window"],
                           ["max_window", "max-window"]]) {
    if ($(id).value !== "") body[key] = Number($(id).value);
  }
  $("set-draft").disabled = true;
  formMessage(`checking ${body.draft_model}…`, "info");
  try {
    const { status, data } = await api("PUT", "/v1/draft", body);
    formMessage(status === 202
      ? `loading ${body.draft_model}; requests switch to it once it is ready`
      : `now drafting with ${body.draft_model}`, "ok");
    awaitingDraft = status === 202 ? body.draft_model : null;
    renderDraft(data);
  } catch (error) {
    formMessage(error.message, "error");
  } finally {
    $("set-draft").disabled = false;
  }
}

async function clearDraft() {
  try {
    const { data } = await api("DELETE", "/v1/draft");
    awaitingDraft = null;
    formMessage("speculation is off from the next request on", "ok");
    renderDraft(data);
  } catch (error) {
    formMessage(error.message, "error");
  }
}

function usageLine(usage, seconds) {
  const tokS = seconds > 0 ? (usage.completion_tokens / seconds).toFixed(1) : "–";
  const spec = usage.speculative;
  let line = `${usage.completion_tokens} tokens, ${tokS} tok/s`;
  if (spec && spec.enabled) {
    line += `; ${spec.strategy}: accepted ${spec.accepted}/${spec.drafted} drafts`
      + ` (${(100 * spec.accept_rate).toFixed(0)} %), ${spec.tokens_per_pass.toFixed(2)} tokens per pass`;
  } else if (spec) {
    line += `; no speculation (${spec.reason})`;
  }
  return line;
}

// Reads an SSE body and calls onData with each `data:` payload.
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6));
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const content = input.value.trim();
  if (!content) return;
  input.value = "";
  const transcript = $("transcript");
  transcript.append(el("div", { class: "msg user" }, content));
  chatHistory.push({ role: "user", content });
  const answer = el("div", { class: "msg assistant", dataset: { chunks: "0", done: "false" } });
  const text = el("span", { class: "text" });
  answer.append(text);
  transcript.append(answer);
  $("chat-send").disabled = true;
  const started = performance.now();
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        messages: chatHistory, stream: true, stream_options: { include_usage: true },
        max_tokens: Number($("chat-max-tokens").value) || 128,
        temperature: Number($("chat-temperature").value) || 0,
      }),
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
    }
    await readEvents(response.body, (payload) => {
      if (payload === "[DONE]") return;
      const data = JSON.parse(payload);
      if (data.error) throw new Error(data.error.message);
      if (data.usage) usage = data.usage;
      const delta = data.choices && data.choices[0] && data.choices[0].delta;
      if (delta && delta.content) {
        text.textContent += delta.content;
        answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        transcript.scrollTop = transcript.scrollHeight;
      }
    });
    chatHistory.push({ role: "assistant", content: text.textContent });
    if (usage) {
      answer.append(el("span", { class: "stats" },
                       usageLine(usage, (performance.now() - started) / 1000)));
    }
  } catch (error) {
    answer.classList.add("error");
    answer.append(el("span", { class: "stats" }, error.message));
    chatHistory.pop(); // the question stays unanswered: do not send it again as context
  } finally {
    answer.dataset.done = "true";
    $("chat-send").disabled = false;
  }
}

$("draft-form").addEventListener("submit", setDraft);
$("clear-draft").addEventListener("click", clearDraft);
$("chat-form").addEventListener("submit", sendChat);
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});
refresh();
setInterval(refresh, POLL_MS);
