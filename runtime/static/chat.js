// Kiln's chat page: the conversation streams through /v1/chat/completions (server-sent events).
// URL parameters preset the settings (?temperature=0&max_tokens=20), ?q=... sends a first message, and
// ?key=... is the server's --api-key, if it has one.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const history = [];
let model = null;
let controller = null;
const auth = params.get("key") ? { Authorization: `Bearer ${params.get("key")}` } : {};

for (const name of ["temperature", "max_tokens"]) {
  if (params.has(name)) $(name).value = params.get(name);
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Yields the parsed JSON of each `data:` event until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
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
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// A small line under an answer: "stopped", token count and speed.
function note(out, text) {
  const div = document.createElement("div");
  div.className = "stats";
  div.textContent = text;
  out.after(div);
}

async function send(text) {
  if (controller) return;
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant typing", "");
  out.dataset.chunks = "0";
  document.body.dataset.state = "streaming";
  $("send").textContent = "Stop";
  controller = new AbortController();
  const started = performance.now();
  let first = null, tokens = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...auth },
      signal: controller.signal,
      body: JSON.stringify({
        model, messages: history, stream: true, stream_options: { include_usage: true },
        temperature: Number($("temperature").value), max_tokens: Number($("max_tokens").value),
      }),
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const piece = chunk.choices[0]?.delta?.content;
      if (piece) {
        if (first === null) { first = performance.now(); out.classList.remove("typing"); }
        out.textContent += piece;
        out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
        out.scrollIntoView({ block: "end" });
      }
    }
    history.push({ role: "assistant", content: out.textContent });
    const seconds = (performance.now() - (first ?? started)) / 1000;
    note(out, `${tokens} tokens · ${seconds > 0 ? (tokens / seconds).toFixed(1) : "–"} tokens/s`);
  } catch (e) {
    out.classList.remove("typing");
    if (e.name === "AbortError") {  // stopped: the partial answer stays in the conversation, marked
      out.classList.add("stopped");
      out.dataset.stopped = "1";
      history.push({ role: "assistant", content: out.textContent });
      note(out, "stopped");
    } else {
      out.classList.add("error");
      out.textContent += (out.textContent ? "\n" : "") + `error: ${e.message}`;
      history.pop();
    }
  } finally {
    controller = null;
    $("send").textContent = "Send";
    out.dataset.done = "1";
    document.body.dataset.state = "idle";
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (controller) { controller.abort(); return; }
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("log").replaceChildren();
});

fetch("/v1/models", { headers: auth }).then((r) => r.json()).then((list) => {
  model = list.data[0].id;
  $("model").textContent = model;
  if (params.get("q")) send(params.get("q"));
});
