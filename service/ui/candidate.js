// The candidate panel of the Versions page: the version on trial beside the promoted one (GET /candidate), the
// figures every worker measured of it, re-read every few seconds while the panel is on screen; set one (shadow
// or canary, a percent), promote it or clear it, with the token.
import { api, clearError, confirmDialog, fixed, h, pageLeft, pct, put, showError } from "./api.js";

const REFRESH_MS = 3000; // the workers write their figures every heartbeat (seconds): faster shows nothing new
const MODES = { shadow: "shadow (its answers only compared)", canary: "canary (it answers clients)" };

// `listing`: GET /versions as the page read it; `promote(version)`: the page's own promote (confirm, re-render).
export function panel(listing, ctx, promote) {
  const p = { ctx, promote, promoted: listing.promoted, cand: null, shown: "" };
  p.now = h("div", { id: "candidate-now" }, h("p", { class: "muted" }, "Reading the candidate…"));
  p.said = h("p", { id: "candidate-said", role: "status" });
  p.box = h("section", { id: "candidate", "aria-labelledby": "candidate-title" },
    h("h3", { id: "candidate-title" }, "Candidate"),
    h("p", { class: "muted" }, "A version tried beside the promoted one before it is promoted: in shadow it also runs ",
      "on a share of the requests and its answers are only compared; as a canary it answers a share of clients."),
    p.now, controls(listing, p), p.said);
  follow(p);
  return p.box;
}

// Re-reads the candidate until the page is left or the panel is drawn again (a promote re-renders the page).
async function follow(p) {
  const { signal } = p.ctx;
  await load(p);
  while (!signal.aborted && p.box.isConnected) {
    await new Promise((resolve) => {
      const t = setTimeout(resolve, REFRESH_MS);
      signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
    });
    if (!signal.aborted && p.box.isConnected && !document.hidden) await load(p);
  }
}

async function load(p) {
  try {
    show(p, await api("/candidate", { signal: p.ctx.signal }));
  } catch (e) {
    if (!pageLeft(e)) showError(e);
  }
}

// Draws the answer of GET or POST /candidate (null: none), only when it changed, so a refresh does not redraw
// a table being read.
function show(p, cand) {
  p.cand = cand;
  p.promoteBtn.disabled = p.clearBtn.disabled = !cand;
  const seen = JSON.stringify(cand);
  if (seen === p.shown) return;
  const first = !p.shown;
  p.shown = seen;
  if (cand && first) { p.pick.value = cand.version; p.mode.value = cand.mode; p.percent.value = cand.percent; }
  if (!cand) {
    put(p.now, h("p", { id: "candidate-state" }, p.promoted ? `No candidate: ${p.promoted}, the promoted version, answers every request.`
      : "No candidate, and nothing is promoted: a candidate is tried beside the promoted version."));
    return;
  }
  const f = cand.figures || {};
  const changed = cand.changed_at && cand.changed_at !== cand.set_at ? `, changed ${when(cand.changed_at)}` : "";
  put(p.now,
    h("p", { id: "candidate-state" }, h("strong", { id: "candidate-version" }, cand.version), " on trial as ",
      h("strong", { id: "candidate-mode" }, cand.mode), " at ", h("strong", { id: "candidate-percent" }, `${cand.percent} %`),
      ` beside ${cand.promoted || "none"}; set ${when(cand.set_at)}${cand.actor ? ` by ${cand.actor}` : ""}${changed}.`),
    figures(f.versions || {}),
    cand.mode === "shadow" || (f.shadow && f.shadow.compared) ? shadow(f.shadow || {}) : null,
    feedback(f.feedback || {}),
    h("p", { class: "muted" }, `Workers reporting: ${cand.workers_reporting ?? "–"}`,
      cand.figures_note ? ` (${cand.figures_note}).` : "."));
}

const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const num = (x) => h("td", { class: "num" }, x ?? "–");
const head = (...cols) => h("thead", {}, h("tr", {}, cols.map((t) => h("th", { scope: "col" }, t))));

function figures(versions) {
  const rows = Object.entries(versions);
  if (!rows.length) return h("p", { id: "candidate-figures", class: "muted" }, "No requests measured in this trial yet.");
  return h("table", { id: "candidate-figures" }, h("caption", { class: "muted" }, "Served in this trial"),
    head("Version", "Role", "Requests", "Errors", "Error rate", "p50 ms", "p99 ms"),
    h("tbody", {}, rows.map(([v, m]) => h("tr", { "data-version": v }, h("th", { scope: "row" }, v), h("td", {}, m.role),
      num(m.requests), num(m.errors), num(pct(m.error_rate)), num(fixed(m.p50_ms, 1)), num(fixed(m.p99_ms, 1))))));
}

function shadow(s) {
  const flips = s.flips || [];
  return h("section", { id: "candidate-shadow" }, h("h4", {}, "Shadow comparison"),
    h("p", {}, "Compared ", h("strong", { id: "shadow-compared" }, s.compared ?? 0), " requests: agreement ",
      h("strong", { id: "shadow-agreement" }, pct(s.agreement)), ", mean |Δ probability| of the promoted answer ",
      h("strong", { id: "shadow-delta" }, fixed(s.mean_abs_delta, 4)), ", dropped ",
      h("strong", { id: "shadow-dropped" }, s.dropped ?? 0), " (no spare CPU), failed ", s.failed ?? 0, "."),
    flips.length ? h("table", { id: "shadow-flips" }, h("caption", { class: "muted" }, "Answers that changed (most first)"),
      head("Promoted said", "Candidate said", "Count"),
      h("tbody", {}, flips.map((x) => h("tr", {}, h("td", {}, x.from), h("td", {}, x.to), num(x.count)))))
      : h("p", { id: "shadow-flips", class: "muted" }, "No answer changed."));
}

function feedback(fb) {
  const rows = Object.entries(fb);
  if (!rows.length) return h("p", { id: "candidate-feedback", class: "muted" }, "No feedback on this trial's predictions yet.");
  return h("table", { id: "candidate-feedback" }, h("caption", { class: "muted" }, "Feedback on this trial's predictions"),
    head("Version", "Labelled", "Correct", "Accuracy"),
    h("tbody", {}, rows.map(([v, m]) => h("tr", { "data-version": v }, h("th", { scope: "row" }, v),
      num(m.labelled), num(m.correct), num(pct(m.accuracy))))));
}

// The form: any version but the promoted one, a mode, a percent; and the promote and clear buttons.
function controls(listing, p) {
  const others = listing.versions.filter((v) => v.id !== listing.promoted).reverse();
  p.pick = h("select", { id: "candidate-pick", required: true }, others.map((v) => h("option", { value: v.id }, v.id)));
  p.mode = h("select", { id: "candidate-pick-mode" }, Object.entries(MODES).map(([m, t]) => h("option", { value: m }, t)));
  p.percent = h("input", { id: "candidate-pick-percent", type: "number", min: 0, max: 100, step: "any", value: 10,
                           required: true, size: 6 });
  const set = h("button", { type: "submit", class: "primary", id: "candidate-set", disabled: !others.length }, "Set candidate");
  p.promoteBtn = h("button", { type: "button", id: "candidate-promote", disabled: true,
                               onclick: () => p.cand && p.promote(p.cand.version) }, "Promote candidate");
  p.clearBtn = h("button", { type: "button", id: "candidate-clear", disabled: true, onclick: () => clear(p) }, "Clear candidate");
  const form = h("form", { id: "candidate-form", autocomplete: "off" },
    h("div", { class: "row" }, h("label", { for: "candidate-pick" }, "Version"), p.pick,
      h("label", { for: "candidate-pick-mode" }, "Mode"), p.mode,
      h("label", { for: "candidate-pick-percent" }, "Percent"), p.percent, set, p.promoteBtn, p.clearBtn),
    others.length ? null : h("p", { class: "muted" }, "No version to try: only the promoted one is published."));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); setCandidate(p, set); });
  return form;
}

async function setCandidate(p, button) {
  const body = { version: p.pick.value, mode: p.mode.value, percent: Number(p.percent.value) };
  // A canary changes what clients are answered, so it is asked first; a shadow answers no one.
  if (body.mode === "canary" && !(await confirmDialog(
    `Let ${body.version} answer ${body.percent} % of clients (canary)?`, `Set ${body.version} as canary`))) return;
  button.disabled = true;
  try {
    const cand = await api("/candidate", { json: body });
    clearError();
    show(p, cand);
    put(p.said, h("span", { class: "ok" }, `${cand.version} is the candidate: ${cand.mode} at ${cand.percent} %.`));
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

async function clear(p) {
  const was = p.cand;
  if (!was) return;
  if (!(await confirmDialog(`End the trial of ${was.version}? Only ${was.promoted || "the promoted version"} answers then.`,
    "Clear candidate"))) return;
  try {
    const r = await api("/candidate", { method: "DELETE" });
    clearError();
    show(p, null);
    put(p.said, h("span", { class: "ok" }, r.cleared ? `Cleared ${r.cleared}: the trial has ended.` : "No candidate was set."));
  } catch (e) {
    showError(e);
  }
}
