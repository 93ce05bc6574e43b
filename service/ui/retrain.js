// Retrain: a zip upload or a dataset of the store, a strategy (auto by default), then the job followed live
// from its record (GET /jobs/{id}: status and the training log's last line) until the version is published,
// with the promotion decision.
import { api, h, pct, showError } from "./api.js";

const STRATEGIES = ["auto", "feature_extraction", "partial", "full", "scratch"];
let polling = null;

export async function render(main, ctx) {
  if (polling) { clearTimeout(polling); polling = null; }
  let datasets = [];
  try { datasets = await api("/datasets"); } catch (e) { showError(e); }
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
  main.append(h("h2", {}, "Retrain"), form, status, await recent());
  main.addEventListener("job-ended", async () => main.querySelector("#recent-jobs").replaceWith(await recent()));
}

async function recent() {
  try {
    const jobs = await api("/jobs?limit=10");
    return h("section", { id: "recent-jobs" }, h("h3", {}, "Recent jobs"), h("table", {},
      h("thead", {}, h("tr", {}, ["Job", "Status", "Created", "Version", "Seconds"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, jobs.map((j) => h("tr", {}, h("td", {}, j.id), h("td", {}, j.status), h("td", {}, j.created || ""),
        h("td", {}, j.result ? j.result.version : ""), h("td", { class: "num" }, j.seconds ?? ""))))));
  } catch (e) {
    return h("p", { class: "muted", id: "recent-jobs" }, `Recent jobs: ${e.message}`);
  }
}

// "head epoch 3/10 ... val_acc 0.9200" and the like, from the training log.
function parse(line, seen) {
  const ep = /(?<!best )epoch (\d+)\/(\d+)/.exec(line || ""); // "best epoch 12/40" is a summary, not progress
  if (ep) { seen.epoch = Number(ep[1]); seen.epochs = Number(ep[2]); }
  const acc = /val_acc(?:uracy)? ([\d.]+)/.exec(line || "");
  if (acc) seen.acc = Number(acc[1]);
}

function follow(id, box, ctx, submit) {
  const seen = { started: Date.now() };
  const bar = h("progress", { id: "job-progress", "aria-label": "Training progress" });
  const line = h("p", { id: "job-line" });
  const figures = h("p", { id: "job-figures" });
  box.replaceChildren(h("h3", {}, `Job ${id}`), bar, figures, line);
  const tick = async () => {
    let job;
    try { job = await api(`/jobs/${encodeURIComponent(id)}`); } catch (e) { showError(e); polling = setTimeout(tick, 3000); return; }
    if (job.started) seen.started = Date.parse(job.started) || seen.started;
    parse(job.progress, seen);
    line.textContent = `${job.status}${job.progress ? `: ${job.progress}` : ""}`;
    const elapsed = (Date.now() - seen.started) / 1000;
    if (seen.epoch && seen.epochs) {
      bar.max = seen.epochs; bar.value = seen.epoch;
      const left = (elapsed / seen.epoch) * (seen.epochs - seen.epoch);
      figures.textContent = `Epoch ${seen.epoch} of at most ${seen.epochs}` +
        (seen.acc !== undefined ? `, validation accuracy so far ${pct(seen.acc)}` : "") +
        `, ${Math.round(elapsed)} s in, about ${Math.round(left)} s left (early stopping may end it sooner)`;
    } else {
      figures.textContent = `${job.status}, ${Math.round(elapsed)} s in`;
    }
    if (job.status === "succeeded" || job.status === "failed") {
      submit.disabled = false;
      bar.max = 1; bar.value = 1;
      await done(id, box);
      await ctx.refreshServing();
      box.dispatchEvent(new Event("job-ended", { bubbles: true }));
      return;
    }
    polling = setTimeout(tick, 1000);
  };
  tick();
}

async function done(id, box) {
  try {
    const r = await api(`/retrain/get?task_id=${encodeURIComponent(id)}`);
    const p = r.promotion || {};
    box.append(h("p", { class: "ok", id: "job-result", role: "status" },
      `Published ${r.version} (${r.strategy}, validation accuracy ${pct(r.val_accuracy)}). `,
      r.promoted ? `Promoted: ${p.reason || "yes"}.` : `Not promoted: ${p.reason || "promotion was off"}.`),
      h("p", {}, h("a", { href: "#versions" }, "See it on the Versions page")));
  } catch (e) {
    box.append(h("p", { class: "bad", id: "job-result" }, e.message));
    showError(e);
  }
}
