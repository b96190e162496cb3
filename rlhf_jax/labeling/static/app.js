// The labeling page: no build step, no dependencies. State lives on the server
// (GET /api/queue, POST /api/label); this file only orders cards and sends rankings.
"use strict";

const FLAG_LABELS = {
  fails_instruction: "fails to follow the instruction",
  fails_constraint: "fails an explicit constraint",
  hallucination: "hallucination (makes something up)",
  inappropriate_language: "inappropriate language",
};
const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
let labeler = null, items = [], labels = {}, flagNames = [], index = 0;
// the card being ordered: [{response: int, tiedWithAbove: bool, flags: {name: bool}}], best first
let cards = [], selected = 0;

async function api(path, options = {}) {
  const headers = Object.assign({"Content-Type": "application/json"}, token ? {"X-Label-Token": token} : {});
  const reply = await fetch(path, Object.assign({headers}, options));
  const body = await reply.json().catch(() => ({error: reply.statusText}));
  if (!reply.ok) throw new Error(body.error || reply.statusText);
  return body;
}

async function loadQueue() {
  const q = await api("/api/queue?labeler=" + encodeURIComponent(labeler));
  items = q.items; labels = q.labels; flagNames = q.flags;
}

function firstUndone(from) {
  for (let step = 0; step < items.length; step++) {
    const i = (from + step) % items.length;
    if (!(items[i].id in labels)) return i;
  }
  return -1;
}

function showProgress() {
  const done = items.filter((it) => it.id in labels).length;
  $("progress-text").textContent = `${done} / ${items.length} done`;
  $("progress-bar").style.width = items.length ? `${100 * done / items.length}%` : "0";
}

function show(i) {
  showProgress();
  if (i < 0) { $("task").hidden = true; $("finished").hidden = false; return; }
  $("finished").hidden = true; $("task").hidden = false;
  index = i;
  const item = items[i], previous = labels[item.id];
  $("item-id").textContent = `item ${item.id}` + (item.overlap ? " (shown to every labeler)" : "");
  $("item-status").textContent = previous ? "already labeled: submitting again replaces it" : "";
  $("prompt").textContent = item.prompt;
  cards = item.responses.map((_, r) => ({
    response: r, tiedWithAbove: false,
    flags: Object.fromEntries(flagNames.map((f) => [f, previous ? Boolean((previous.flags[f] || [])[r]) : false])),
  }));
  if (previous) {  // the earlier ranking, best first, ties kept
    cards.sort((a, b) => previous.ranks[a.response] - previous.ranks[b.response] || a.response - b.response);
    cards.forEach((c, n) => { c.tiedWithAbove = n > 0 && previous.ranks[c.response] === previous.ranks[cards[n - 1].response]; });
  }
  selected = 0; $("message").textContent = "";
  render();
}

function ranks() {  // ranks[response] = position group, 0 = best; tied cards share one
  const out = new Array(cards.length);
  let rank = -1;
  cards.forEach((c, n) => { if (n === 0 || !c.tiedWithAbove) rank++; out[c.response] = rank; });
  return out;
}

function render() {
  const list = $("responses"), item = items[index], r = ranks();
  list.replaceChildren();
  cards.forEach((card, n) => {
    const li = document.createElement("li");
    li.draggable = true; li.dataset.position = n; li.dataset.response = card.response;
    li.className = (n === selected ? "selected " : "") + (card.tiedWithAbove ? "tied" : "");
    const rank = document.createElement("span"); rank.className = "rank"; rank.textContent = `#${r[card.response] + 1}`;
    const text = document.createElement("span"); text.className = "text"; text.textContent = item.responses[card.response];
    li.append(rank, text);
    if (n > 0) {
      const tie = document.createElement("label"); tie.className = "tie";
      const box = document.createElement("input"); box.type = "checkbox"; box.checked = card.tiedWithAbove;
      box.onchange = () => { card.tiedWithAbove = box.checked; render(); };
      tie.append(box, " tie with the one above"); li.append(tie);
    }
    const flags = document.createElement("div"); flags.className = "flags";
    flagNames.forEach((f, k) => {
      const label = document.createElement("label");
      const box = document.createElement("input"); box.type = "checkbox"; box.checked = card.flags[f];
      box.dataset.flag = f;
      box.onchange = () => { card.flags[f] = box.checked; };
      label.append(box, ` ${k + 1}: ${FLAG_LABELS[f] || f}`); flags.append(label);
    });
    li.append(flags);
    // select without re-rendering: a click on a flag's or tie's label text must still reach
    // its checkbox, which a re-render here would have replaced before the click's activation
    li.onclick = () => { selected = n; markSelected(); };
    li.ondragstart = (e) => { e.dataTransfer.setData("text/plain", String(n)); li.classList.add("dragging"); };
    li.ondragend = () => li.classList.remove("dragging");
    li.ondragover = (e) => e.preventDefault();
    li.ondrop = (e) => { e.preventDefault(); move(Number(e.dataTransfer.getData("text/plain")), n); };
    list.append(li);
  });
}

function markSelected() {
  [...$("responses").children].forEach((li, n) => li.classList.toggle("selected", n === selected));
}

function move(from, to) {
  if (from === to || to < 0 || to >= cards.length) return;
  const [card] = cards.splice(from, 1);
  cards.splice(to, 0, card);
  cards[0].tiedWithAbove = false;
  selected = to; render();
}

async function submit() {
  const item = items[index], r = ranks();
  const flags = Object.fromEntries(flagNames.map((f) => [f, item.responses.map((_, k) => cards.find((c) => c.response === k).flags[f])]));
  try {
    await api("/api/label", {method: "POST", body: JSON.stringify({labeler, item_id: item.id, ranks: r, flags})});
    labels[item.id] = {ranks: r, flags};
    await loadQueue();  // another labeler may have taken items meanwhile
    const at = items.findIndex((it) => it.id === item.id);
    show(firstUndone(at < 0 ? 0 : at + 1));
  } catch (err) { $("message").textContent = `Not saved: ${err.message}`; }
}

function skip() { const next = firstUndone(index + 1); show(next === index ? index : next); }
function back() { if (items.length) show((index - 1 + items.length) % items.length); }

document.addEventListener("keydown", (e) => {
  if ($("task").hidden || e.target.tagName === "INPUT" && e.target.type === "text") return;
  if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    const to = selected + (e.key === "ArrowDown" ? 1 : -1);
    if (e.shiftKey) move(selected, to); else if (to >= 0 && to < cards.length) { selected = to; render(); }
    e.preventDefault();
  } else if (e.key === "=") { if (selected > 0) { cards[selected].tiedWithAbove = !cards[selected].tiedWithAbove; render(); } }
  else if (/^[1-9]$/.test(e.key) && Number(e.key) <= flagNames.length) {
    const f = flagNames[Number(e.key) - 1]; cards[selected].flags[f] = !cards[selected].flags[f]; render();
  } else if (e.key === "Enter") { submit(); e.preventDefault(); }
  else if (e.key === "s") skip();
  else if (e.key === "b" || e.key === "ArrowLeft") back();
});

async function start() {
  const name = $("labeler").value.trim();
  try {
    labeler = name; await loadQueue();
  } catch (err) { $("login-message").textContent = err.message; return; }
  $("login-message").textContent = "";
  localStorage.setItem("rlhf-jax-labeler", name);
  $("login").hidden = true;
  show(firstUndone(0));
}

$("labeler").value = localStorage.getItem("rlhf-jax-labeler") || "";
$("labeler").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
$("start").onclick = start;
$("submit").onclick = submit;
$("skip").onclick = skip;
$("back").onclick = back;
$("review").onclick = () => show(0);
