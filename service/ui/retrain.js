// Retrain: a zip upload or a dataset of the store, a strategy (auto by default), then the job followed live
// from its record (GET /jobs/{id}: status and progress: phase, epoch, best accuracy, time left) until the
// version is published, with the promotion decision.
import { api, h, pageLeft, pct, showError } from "./api.js";

const STRATEGIES = ["auto", "feature_extraction", "partial", "full", "scratch"];
let polling = null;

export async function render(main, ctx) {
  if (polling) { clearTimeout(polling); polling = null; }
  let datasets = [];
  try { datasets = await api("/datasets", { signal: ctx.signal }); } catch (e) { showError(e); }
  const zip = h("input", { id: "zip", type: "file", accept: ".zip,application/zip" });
  const pick = h("select", { id: "dataset-name" }, datasets.map((d) => h("option", { value: d.dataset },
    `${d.dataset} (${d.images} images, ${d.classes} classes)`)));
  const srcZip = h("input", { type: "radio", name: "source", id: "source-zip", value: "zip", checked: true });
  const srcDs = h("input", { type: "radio", name: "source", id: "source-dataset", value: "dataset",
                             disabled: !datasets.length });
  const strategy = h("select", { id: "strategy" }, STRATEGIES.map((s) => h("option", { value: s }, s)));
  const promote = h("select", { id: "promote" }, [["auto", "auto: if at least as good"], ["true", "always"],
                                                  ["false", "never"]].map(([v, t]) => h("option", { value: v }, t)));
  const name = h("input", { id: "upload-name", placeholder: "uploads", pattern: "[A-Za-z0-9._-]{1,64}" });
  const submit = h("button", { type: "submit", class: "primary", id: "start" }, "Start retrain");
  const status = h("section", { id: "job", "aria-live": "polite" });
  const form = h("form", { id: "retrain-form" },
    h("fieldset", {}, h("legend", {}, "Data"),
      h("div", { class: "row" }, srcZip, h("label", { for: "source-zip" }, "Upload a .zip (one folder per class)"), zip,
        h("label", { for: "upload-name" }, "as dataset"), name),
      h("div", { class: "row" }, srcDs, h("label", { for: "source-dataset" }, "A dataset of the store"), pick,
        datasets.length ? null : h("span", { class: "muted" }, "(none yet)"))),
    h("div", { class: "row" }, h("label", { for: "strategy" }, "Strategy"), strategy,
      h("label", { for: "promote" }, "Promote"), promote, submit));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    try {
      let reply;
      if (srcDs.checked) {
        reply = await api("/retrain/submit", { json: { dataset: pick.value, strategy: strategy.value,
          promote: promote.value === "auto" ? "auto" : promote.value === "true" } });
      } else {
        if (!zip.files.length) throw new Error("choose a .zip to upload, or pick a dataset");
        const fd = new FormData();
        fd.append("dataset", zip.files[0], zip.files[0].name);
        fd.append("strategy", strategy.value);
        fd.append("promote", promote.value);
        if (name.value.trim()) fd.append("dataset", name.value.trim());
        reply = await api("/retrain/submit", { form: fd });
      }
      follow(reply.task_id, status, ctx, submit);
    } catch (e) {
      showError(e);
      submit.disabled = false;
    }
  });
  if (ctx.signal.aborted) return;
  main.append(h("h2", {}, "Retrain"), form, status, await recent(ctx.signal));
  main.addEventListener("job-ended", async () => main.querySelector("#recent-jobs").replaceWith(await recent(ctx.signal)));
}

async function recent(signal) {
  try {
    const jobs = await api("/jobs?limit=10", { signal });
    return h("section", { id: "recent-jobs" }, h("h3", {}, "Recent jobs"), h("table", {},
      h("thead", {}, h("tr", {}, ["Job", "Status", "Created", "Version", "Seconds"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, jobs.map((j) => h("tr", {}, h("td", {}, j.id), h("td", {}, j.status), h("td", {}, j.created || ""),
        h("td", {}, j.result ? j.result.version : ""), h("td", { class: "num" }, j.seconds ?? ""))))));
  } catch (e) {
    return h("p", { class: "muted", id: "recent-jobs" }, `Recent jobs: ${e.message}`);
  }
}

const PHASES = { preparing: "Preparing the data", features: "Computing features", head: "Training the head",
  partial: "Partial fine-tuning", full: "Full fine-tuning", scratch: "Training from scratch",
  finishing: "Exporting, checking and publishing", done: "Done" };

// The job's `progress`: {phase, epoch, epochs, best_val_acc, eta_seconds, elapsed_seconds, message}; a job
// without one yet (or from an older server) has the last line of its training log, a string.
function show(job, elapsed, bar, figures) {
  const p = job.progress;
  const secs = `${Math.round(elapsed)} s in`;
  if (!p || typeof p !== "object") {
    bar.removeAttribute("value");
    figures.textContent = `${job.status}, ${secs}`;
    return;
  }
  const parts = [PHASES[p.phase] || p.phase];
  if (p.epochs) {
    bar.max = p.epochs; bar.value = p.epoch || 0;
    parts[0] += `: epoch ${p.epoch || 0} of at most ${p.epochs}`;
  } else if (p.phase === "done") {
    bar.max = 1; bar.value = 1;
  } else {
    bar.removeAttribute("value"); // indeterminate: a phase without epochs
  }
  if (p.best_val_acc !== null && p.best_val_acc !== undefined) parts.push(`best validation accuracy so far ${pct(p.best_val_acc)}`);
  parts.push(secs);
  if (p.eta_seconds !== null && p.eta_seconds !== undefined && p.phase !== "done") {
    parts.push(`about ${Math.round(p.eta_seconds)} s left${p.epochs ? " (early stopping may end it sooner)" : ""}`);
  }
  figures.textContent = parts.join(", ");
}

function follow(id, box, ctx, submit) {
  let started = Date.now();
  const bar = h("progress", { id: "job-progress", "aria-label": "Training progress" });
  const line = h("p", { id: "job-line" });
  const figures = h("p", { id: "job-figures" });
  box.replaceChildren(h("h3", {}, `Job ${id}`), bar, figures, line);
  // Following stops when the page is left (ctx.signal); the job runs on, listed under Recent jobs.
  const tick = async () => {
    let job;
    try { job = await api(`/jobs/${encodeURIComponent(id)}`, { signal: ctx.signal }); } catch (e) {
      if (pageLeft(e)) return;
      showError(e); polling = setTimeout(tick, 3000); return;
    }
    if (job.started) started = Date.parse(job.started) || started;
    const p = job.progress;
    const message = p && typeof p === "object" ? p.message : p;
    line.textContent = `${job.status}${message ? `: ${message}` : ""}`;
    show(job, (Date.now() - started) / 1000, bar, figures);
    if (job.status === "succeeded" || job.status === "failed") {
      submit.disabled = false;
      bar.max = 1; bar.value = 1;
      await done(id, box, ctx.signal);
      await ctx.refreshServing();
      box.dispatchEvent(new Event("job-ended", { bubbles: true }));
      return;
    }
    polling = setTimeout(tick, 1000);
  };
  tick();
}

async function done(id, box, signal) {
  try {
    const r = await api(`/retrain/get?task_id=${encodeURIComponent(id)}`, { signal });
    const p = r.promotion || {};
    box.append(h("p", { class: "ok", id: "job-result", role: "status" },
      `Published ${r.version} (${r.strategy}, validation accuracy ${pct(r.val_accuracy)}). `,
      r.promoted ? `Promoted: ${p.reason || "yes"}.` : `Not promoted: ${p.reason || "promotion was off"}.`),
      r.auto && r.auto.summary ? h("p", { id: "job-why" }, `Strategy: ${r.auto.summary}.`) : null,
      h("p", {}, h("a", { href: "#versions" }, "See it on the Versions page")));
  } catch (e) {
    box.append(h("p", { class: "bad", id: "job-result" }, e.message));
    showError(e);
  }
}
