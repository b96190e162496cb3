// The labeling page: no build step, no dependencies. State lives on the server
// (GET /api/queue, POST /api/label and /api/skip); this file shows one item at a time and
// builds its ranking (ranking.js), ratings and flags.
"use strict";

const FLAG_KEYS = {i: "fails_instruction", c: "fails_constraint", h: "hallucination", l: "inappropriate_language"};
const FLAG_NAMES = {fails_instruction: "fails instruction", fails_constraint: "fails constraint",
  hallucination: "hallucination", inappropriate_language: "inappropriate language"};
const LETTERS = "ABCDEFGHI";
const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);

let queue = null;   // the server's answer to GET /api/queue
let labeler = null, index = 0;
// the item on screen
let groups = [], ratings = [], flags = {}, selected = 0, touched = false, letterOf = [];
let clock = {total: 0, since: null};  // time on the item, counted while the page is visible

async function api(path, options = {}) {
  const headers = Object.assign({"Content-Type": "application/json"}, token ? {"X-Label-Token": token} : {});
  const reply = await fetch(path, Object.assign({headers}, options));
  const body = await reply.json().catch(() => ({error: reply.statusText}));
  if (!reply.ok) throw new Error(body.error || reply.statusText);
  return body;
}

const item = () => queue.items[index];
const labeled = (id) => id in queue.labels;
const skippedForGood = (id) => !labeled(id) && id in queue.skips && queue.skips[id] !== "later";
const done = (id) => labeled(id) || skippedForGood(id);

// a prompt is a string, or a conversation: [{role, content}], shown one message a paragraph
const promptText = (prompt) => Array.isArray(prompt) ? prompt.map((m) => `${m.role}: ${m.content}`).join("\n\n") : prompt;

function announce(text) {  // read out by screen readers (an aria-live region)
  const region = $("announce");
  region.textContent = "";
  requestAnimationFrame(() => { region.textContent = text; });
}

async function loadQueue() {
  queue = await api("/api/queue?labeler=" + encodeURIComponent(labeler));
}

function firstUndone(from) {
  for (let step = 0; step < queue.items.length; step++) {
    const i = (from + step) % queue.items.length;
    if (!done(queue.items[i].id)) return i;
  }
  return -1;
}

function showProgress() {
  const n = queue.items.length, finished = queue.items.filter((it) => done(it.id)).length;
  const skipped = queue.items.filter((it) => skippedForGood(it.id)).length;
  $("progress-text").textContent = `${finished} / ${n} done` + (skipped ? ` (${skipped} skipped)` : "");
  $("progress-bar").style.width = n ? `${100 * finished / n}%` : "0";
}

function seconds() {
  return (clock.total + (clock.since === null ? 0 : performance.now() - clock.since)) / 1000;
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden && clock.since !== null) { clock.total += performance.now() - clock.since; clock.since = null; }
  else if (!document.hidden && clock.since === null) clock.since = performance.now();
});

function show(i) {
  showProgress();
  $("message").textContent = "";
  if (i < 0) { $("task").hidden = true; $("finished").hidden = false; return; }
  $("finished").hidden = true; $("task").hidden = false;
  index = i;
  const it = item(), previous = queue.labels[it.id], k = it.responses.length;
  letterOf = [];
  it.display_order.forEach((response, position) => { letterOf[response] = LETTERS[position]; });
  $("item-id").textContent = `Item ${i + 1} of ${queue.items.length}`;
  $("item-status").textContent = previous ? "already labeled: submitting again replaces it"
    : it.id in queue.skips ? `skipped (${queue.skip_reasons[queue.skips[it.id]]}): you may label it now` : "";
  $("prompt").textContent = promptText(it.prompt);
  groups = previous ? Ranking.fromRanks(previous.ranks, it.display_order) : Ranking.fromOrder(it.display_order);
  ratings = previous && previous.ratings ? previous.ratings.slice() : new Array(k).fill(null);
  flags = Object.fromEntries(Object.keys(queue.flags).map((f) => [f, it.responses.map((_, r) =>
    Boolean(previous && (previous.flags[f] || [])[r]))]));
  touched = Boolean(previous);
  selected = Ranking.flat(groups)[0];
  clock = {total: 0, since: document.hidden ? null : performance.now()};
  render();
  if (!previous) {  // keeps it from the others' queues while it is on this screen
    api("/api/open", {method: "POST", body: JSON.stringify({labeler, item_id: it.id})}).catch(() => {});
  }
}

function button(text, className, label, onclick) {
  const b = document.createElement("button");
  b.type = "button"; b.className = className; b.textContent = text; b.onclick = onclick;
  if (label) b.setAttribute("aria-label", label);
  return b;
}

function cardLabel(response) {
  const tie = Ranking.tiedWithAbove(groups, response) ? ", tied with the one above" : "";
  const rating = ratings[response] ? `, rated ${ratings[response]} of ${queue.rating_scale}` : ", not rated";
  return `Response ${letterOf[response]}: rank ${Ranking.rankOf(groups, response) + 1}${tie}${rating}`;
}

// Builds the cards again; `focus` ("up", "down", "tie", "rate-N") puts the keyboard focus
// back on that control of the selected card, which the rebuild replaced.
function render(focus) {
  const list = $("responses"), it = item(), order = Ranking.flat(groups);
  list.replaceChildren();
  order.forEach((response, position) => {
    const li = document.createElement("li");
    li.className = "card" + (response === selected ? " selected" : "") +
      (Ranking.tiedWithAbove(groups, response) ? " tied" : "");
    li.draggable = true; li.tabIndex = -1; li.dataset.response = response;
    li.setAttribute("aria-label", cardLabel(response));
    if (response === selected) li.setAttribute("aria-current", "true");

    const head = document.createElement("div"); head.className = "card-head";
    const rank = document.createElement("span"); rank.className = "rank";
    rank.textContent = `#${Ranking.rankOf(groups, response) + 1}`;
    const letter = document.createElement("span"); letter.className = "letter"; letter.textContent = letterOf[response];
    head.append(rank, letter);
    if (position > 0) {
      const tie = document.createElement("label"); tie.className = "tie";
      const box = document.createElement("input"); box.type = "checkbox";
      box.checked = Ranking.tiedWithAbove(groups, response);
      box.onchange = () => { selected = response; toggleTie(); render("tie"); };
      tie.append(box, " tie with the one above"); head.append(tie);
    }
    const moves = document.createElement("div"); moves.className = "move";
    const up = button("\u25B2", "up", `Move response ${letterOf[response]} up`, () => { selected = response; move(-1); render("up"); });
    const down = button("\u25BC", "down", `Move response ${letterOf[response]} down`, () => { selected = response; move(1); render("down"); });
    const g = Ranking.rankOf(groups, response), alone = groups[g].length === 1;  // a tied one can always leave its tie
    up.disabled = g === 0 && alone;
    down.disabled = g === groups.length - 1 && alone;
    moves.append(up, down); head.append(moves);

    const text = document.createElement("div"); text.className = "text"; text.textContent = it.responses[response];
    if (!it.responses[response].trim()) { text.classList.add("empty"); text.textContent = "(empty response)"; }

    const rate = document.createElement("div"); rate.className = "rating"; rate.setAttribute("role", "group");
    rate.setAttribute("aria-label", `Rate response ${letterOf[response]}, 1 worst to ${queue.rating_scale} best`);
    const caption = document.createElement("span"); caption.className = "caption"; caption.textContent = "Rating";
    rate.append(caption);
    for (let v = 1; v <= queue.rating_scale; v++) {
      const b = button(String(v), "rate", null, () => { selected = response; setRating(v); render(`rate-${v}`); });
      b.dataset.value = v; b.setAttribute("aria-pressed", String(ratings[response] === v));
      rate.append(b);
    }

    const flagRow = document.createElement("div"); flagRow.className = "flags";
    Object.keys(queue.flags).forEach((f) => {
      const label = document.createElement("label"); label.title = queue.flags[f];
      const box = document.createElement("input"); box.type = "checkbox"; box.checked = flags[f][response];
      box.dataset.flag = f;
      box.onchange = () => { flags[f][response] = box.checked; announceFlag(response, f); };
      label.append(box, ` ${FLAG_NAMES[f] || f}`); flagRow.append(label);
    });
    const controls = document.createElement("div"); controls.className = "controls";
    controls.append(rate, flagRow);
    li.append(head, text, controls);
    // select without re-rendering: a click on a flag's label text must still reach its
    // checkbox, which a re-render here would have replaced before the click's activation
    li.addEventListener("click", () => { selected = response; markSelected(); });
    li.ondragstart = (e) => { e.dataTransfer.setData("text/plain", String(response)); li.classList.add("dragging"); };
    li.ondragend = () => li.classList.remove("dragging");
    li.ondragover = (e) => e.preventDefault();
    li.ondrop = (e) => {
      e.preventDefault();
      const from = Number(e.dataTransfer.getData("text/plain"));
      groups = Ranking.dropOn(groups, from, response); selected = from; touched = true;
      render(); announceRank(from, "moved");
    };
    list.append(li);
  });
  if (focus) {
    const card = list.querySelector(`li[data-response="${selected}"]`);
    const control = focus === "tie" ? card.querySelector(".tie input")
      : focus.startsWith("rate-") ? card.querySelector(`.rate[data-value="${focus.slice(5)}"]`) : card.querySelector(`.${focus}`);
    (control && !control.disabled ? control : card).focus();
  }
}

function markSelected() {
  [...$("responses").children].forEach((li) => {
    const on = Number(li.dataset.response) === selected;
    li.classList.toggle("selected", on);
    if (on) li.setAttribute("aria-current", "true"); else li.removeAttribute("aria-current");
  });
}

function announceRank(response, what) {
  const rank = Ranking.rankOf(groups, response) + 1, ranks = groups.length;
  const mates = groups[rank - 1].filter((r) => r !== response).map((r) => letterOf[r]);
  announce(`Response ${letterOf[response]} ${what}: rank ${rank} of ${ranks}` + (mates.length ? `, tied with ${mates.join(" and ")}` : ""));
}

function announceFlag(response, f) {
  announce(`Response ${letterOf[response]} ${flags[f][response] ? "flagged" : "no longer flagged"}: ${FLAG_NAMES[f] || f}`);
}

function move(step) {
  const before = JSON.stringify(groups);
  groups = Ranking.move(groups, selected, step);
  if (JSON.stringify(groups) === before) { announce(`Response ${letterOf[selected]} is already ${step > 0 ? "last" : "first"}`); return; }
  touched = true; announceRank(selected, step > 0 ? "moved down" : "moved up");
}

function toggleTie() {
  if (Ranking.flat(groups)[0] === selected) { announce(`Response ${letterOf[selected]} is first: nothing above to tie with`); return; }
  const wasTied = Ranking.tiedWithAbove(groups, selected);
  groups = Ranking.toggleTie(groups, selected); touched = true;
  announceRank(selected, wasTied ? "untied" : "tied with the one above");
}

function setRating(value) {
  ratings[selected] = value;
  announce(`Response ${letterOf[selected]} rated ${value} of ${queue.rating_scale}`);
}

function select(step) {
  const order = Ranking.flat(groups), to = order.indexOf(selected) + step;
  if (to < 0 || to >= order.length) return;
  selected = order[to]; render();
  $("responses").querySelector(`li[data-response="${selected}"]`).focus();
}

let saving = false;  // one submission at a time: a second Enter meanwhile does nothing

async function submit(confirmed = false) {
  if (saving) return;
  const it = item();
  const unrated = Ranking.flat(groups).filter((r) => !ratings[r]);
  if (unrated.length) {
    $("message").textContent = `Rate every response from 1 to ${queue.rating_scale} first: ` +
      `${unrated.map((r) => letterOf[r]).join(", ")} ${unrated.length > 1 ? "are" : "is"} not rated.`;
    selected = unrated[0]; render(); $("responses").querySelector(`li[data-response="${selected}"]`).focus();
    return;
  }
  if (!touched && !confirmed) { $("confirm").showModal(); return; }
  saving = true;
  try {
    const body = {labeler, item_id: it.id, ranks: Ranking.ranks(groups), ratings, flags, seconds: seconds()};
    await api("/api/label", {method: "POST", body: JSON.stringify(body)});
    await afterSave(it.id, `Saved item ${index + 1}`);
  } catch (err) { $("message").textContent = `Not saved: ${err.message}`; }
  finally { saving = false; }
}

async function afterSave(id, what) {
  try { await loadQueue(); }  // another labeler may have taken items meanwhile
  catch (err) { $("message").textContent = `${what}, but the next items could not be loaded: ${err.message}`; return; }
  const at = queue.items.findIndex((x) => x.id === id);
  announce(what);
  show(firstUndone(at < 0 ? 0 : at + 1));
}

function openSkip() {
  const box = $("skip-reasons");
  box.querySelectorAll("label").forEach((l) => l.remove());
  Object.entries(queue.skip_reasons).forEach(([reason, text], n) => {
    const label = document.createElement("label");
    const radio = document.createElement("input"); radio.type = "radio"; radio.name = "skip-reason";
    radio.value = reason; radio.checked = n === 0;
    label.append(radio, ` ${text}`); box.append(label);
  });
  $("skip-note").value = ""; $("skip-message").textContent = "";
  $("skip-dialog").showModal();
}

async function confirmSkip() {
  const it = item(), reason = document.querySelector("input[name=skip-reason]:checked").value;
  try {
    const body = {labeler, item_id: it.id, reason, note: $("skip-note").value, seconds: seconds()};
    await api("/api/skip", {method: "POST", body: JSON.stringify(body)});
  } catch (err) { $("skip-message").textContent = `Not skipped: ${err.message}`; return; }
  $("skip-dialog").close();
  await afterSave(it.id, `Skipped item ${index + 1}`);
}

function back() { if (queue.items.length) show((index - 1 + queue.items.length) % queue.items.length); }

async function openGuidelines() {
  if (!$("guidelines-body").childElementCount) {
    const g = await api("/api/guidelines");
    $("guidelines-body").innerHTML = g.html;  // rendered on the server from Markdown, raw HTML escaped
  }
  $("guidelines-dialog").showModal();
}

const NATIVE_ENTER = new Set(["BUTTON", "A", "SUMMARY", "SELECT", "TEXTAREA"]);

document.addEventListener("keydown", (e) => {
  // browser shortcuts (Ctrl+S, Cmd+R, ...) are not ours; a dialog handles its own keys
  if (e.ctrlKey || e.metaKey || e.altKey || document.querySelector("dialog[open]") || $("task").hidden) return;
  const target = e.target, typing = target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type === "text");
  if (typing) return;
  const key = e.key;
  if (key === "Enter") {
    if (NATIVE_ENTER.has(target.tagName)) return;  // Enter on a focused button presses that button
    submit(); e.preventDefault();
  } else if (key === "ArrowDown" || key === "ArrowUp") {
    const step = key === "ArrowDown" ? 1 : -1;
    if (e.shiftKey) { move(step); render(); $("responses").querySelector(`li[data-response="${selected}"]`).focus(); }
    else select(step);
    e.preventDefault();
  } else if (key === "=") { toggleTie(); render(); }
  else if (/^[1-9]$/.test(key) && Number(key) <= queue.rating_scale) { setRating(Number(key)); render(); }
  else if (key.toLowerCase() in FLAG_KEYS && !e.shiftKey) {
    const f = FLAG_KEYS[key.toLowerCase()]; flags[f][selected] = !flags[f][selected]; render(); announceFlag(selected, f);
  } else if (key === "s") { openSkip(); e.preventDefault(); }
  else if (key === "b" || key === "ArrowLeft") back();
  else if (key === "g") openGuidelines();
  else if (key === "?") { $("help").showModal(); e.preventDefault(); }
});

async function start() {
  const name = $("labeler").value.trim();
  try {
    labeler = name; await loadQueue();
  } catch (err) { $("login-message").textContent = err.message; return; }
  $("login-message").textContent = "";
  localStorage.setItem("rlhf-jax-labeler", name);
  $("login").hidden = true;
  $("open-guidelines").disabled = false;
  $("flag-meanings").replaceChildren(...Object.entries(queue.flags).flatMap(([f, meaning]) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = `${FLAG_NAMES[f] || f} (${Object.keys(FLAG_KEYS).find((k) => FLAG_KEYS[k] === f)})`;
    dd.textContent = meaning;
    return [dt, dd];
  }));
  show(firstUndone(0));
  const seen = `rlhf-jax-guidelines-seen:${labeler}`;
  if (localStorage.getItem(seen) !== queue.guidelines) {  // first visit, or the guidelines changed
    await openGuidelines();
    $("guidelines-dialog").addEventListener("close", () => localStorage.setItem(seen, queue.guidelines), {once: true});
  }
}

document.querySelectorAll("dialog .close").forEach((b) => { b.onclick = () => b.closest("dialog").close(); });
$("labeler").value = localStorage.getItem("rlhf-jax-labeler") || "";
$("labeler").addEventListener("keydown", (e) => { if (e.key === "Enter") start(); });
$("start").onclick = start;
$("submit").onclick = () => submit();
$("skip").onclick = openSkip;
$("back").onclick = back;
$("review").onclick = () => show(0);
$("open-help").onclick = () => $("help").showModal();
$("open-guidelines").onclick = openGuidelines;
$("criteria-guidelines").onclick = (e) => { e.preventDefault(); openGuidelines(); };
$("confirm-keep").onclick = () => { $("confirm").close(); announce("Not submitted: rank the responses, then submit"); };
$("confirm-submit").onclick = () => { $("confirm").close(); submit(true); };
$("skip-cancel").onclick = () => $("skip-dialog").close();
$("skip-confirm").onclick = confirmSkip;
