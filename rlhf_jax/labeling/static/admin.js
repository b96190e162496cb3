// The lead's view: GET /api/admin (rlhf_jax.labeling.stats.label_stats) as tables, every
// 15 s. Text from labels goes in with textContent only.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
const REASONS = {cant_judge: "can't judge", broken: "broken or unreadable", later: "for later", other: "other"};
const pct = (x) => (x === null || x === undefined ? "n/a" : `${(100 * x).toFixed(1)}%`);
const secs = (x) => (x === null || x === undefined ? "n/a" : `${x.toFixed(0)} s`);

function row(cells) {
  const tr = document.createElement("tr");
  cells.forEach(([text, cls]) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.append(td);
  });
  return tr;
}

function fill(id, rows, empty) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows.map(row));
  if (!rows.length) {
    const n = $(id).querySelectorAll("th").length;
    const tr = row([[empty]]); tr.firstChild.colSpan = n; body.append(tr);
  }
}

function render(s) {
  $("summary").textContent = `${s.items} items, ${s.overlap_items} in the overlap set (labeled by everyone); ` +
    `${Object.values(s.labelers).reduce((a, b) => a + b, 0)} labels by ${Object.keys(s.labelers).length} labelers; ` +
    `inter-labeler agreement ${pct(s.inter_labeler_agreement)} of ${s.inter_labeler_pairs} pairs` +
    (s.gold_agreement !== undefined ? `; with the gold scorer ${pct(s.gold_agreement)}` : "") +
    `; guidelines version ${s.guidelines.version} (${s.guidelines.source}).`;
  const gold = s.gold_agreement_by_labeler || {};
  fill("labelers", Object.entries(s.progress).map(([name, p]) => [
    [name], [p.labeled, "num"], [p.skipped + (p.skipped_for_later ? ` (+${p.skipped_for_later} for later)` : ""), "num"],
    [p.to_do, "num"], [`${p.overlap_labeled} / ${s.overlap_items}`, "num"],
    [`${secs(p.seconds_median)} / ${secs(p.seconds_mean)}`, "num"],
    [`${pct(s.agreement_with_others[name].agreement)} of ${s.agreement_with_others[name].pairs}`, "num"],
    [pct(gold[name]), "num"], [pct(p.kept_shown_order), "num"], [pct(p.first_shown_ranked_best), "num"],
    [pct(p.ratings_agree_with_ranking), "num"], [p.last_time ? p.last_time.replace("T", " ").slice(0, 19) : "n/a"],
  ]), "nobody has labeled yet");
  fill("pairs", Object.entries(s.by_labeler_pair).map(([pair, v]) => [[pair], [pct(v.agreement), "num"], [v.pairs, "num"]]),
    "needs two labelers");
  fill("disagreement", s.most_disagreement.map((d) => [
    [d.item_id], [pct(d.agreement), "num"], [d.pairs, "num"],
    [Array.isArray(d.prompt) ? d.prompt.map((m) => `${m.role}: ${m.content}`).join(" / ") : d.prompt, "prompt-cell"],
    [Object.entries(d.ranks).map(([name, ranks]) => `${name}: ${ranks.join(" ")}`).join("; ")],
  ]), "no item has two labels yet");
  fill("skips", s.skips.map((k) => [
    [(k.time || "").replace("T", " ").slice(0, 19)], [k.labeler], [k.item_id],
    [(REASONS[k.reason] || k.reason) + (k.labeled_since ? " (labeled since)" : "")], [k.note || ""],
  ]), "no skips");
  $("flags").textContent = Object.entries(s.flag_rates).map(([f, r]) => `${f.replaceAll("_", " ")} ${pct(r)}`).join(", ");
  $("problems").replaceChildren(...(s.problems.length ? s.problems : ["none"]).map((p) => {
    const li = document.createElement("li"); li.textContent = p; return li;
  }));
}

async function refresh() {
  try {
    const reply = await fetch("/api/admin", {headers: token ? {"X-Label-Token": token} : {}});
    const body = await reply.json();
    if (!reply.ok) throw new Error(body.error || reply.statusText);
    render(body);
    $("error").textContent = "";
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) { $("error").textContent = `Could not load the numbers: ${err.message}`; }
}

$("refresh").onclick = refresh;
refresh();
setInterval(refresh, 15000);
