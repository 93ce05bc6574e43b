// Versions: every version with its figures; one version's detail (per-class precision/recall/F1, the
// confusion matrix and per-epoch curves training drew, lineage, label problems); promote and roll back
// after a confirmation, with the token; the candidate on trial (candidate.js).
import { api, confirmDialog, fixed, h, imageURL, pageLeft, pct, project, put, showError } from "./api.js";
import { panel } from "./candidate.js";

export async function render(main, ctx) {
  const listing = await api("/versions", { signal: ctx.signal });
  const detail = h("section", { id: "version-detail", "aria-live": "polite" });
  const rollback = h("button", { type: "button", id: "rollback", onclick: () => act(ctx, main, null) }, "Roll back one step");
  put(main,
    h("h2", {}, "Versions"),
    h("p", { id: "versions-model", class: "muted" }, `Project ${project()}`,
      listing.versions.length && listing.versions[0].tag ? `, BentoML model ${listing.versions[0].tag.split(":")[0]}` : ""),
    listing.problem ? h("p", { class: "bad" }, listing.problem) : null,
    h("div", { class: "row" }, h("span", {}, "Promoted: ", h("strong", { id: "versions-promoted" }, listing.promoted || "none")), rollback),
    table(listing, ctx, main, detail),
    panel(listing, ctx, (version) => act(ctx, main, version)),
    serving(listing),
    detail);
}

function table(listing, ctx, main, detail) {
  const rows = [...listing.versions].reverse().map((v) => {
    const m = v.metrics || {};
    const lin = v.lineage && v.lineage.dataset ? `${v.lineage.dataset} @ ${v.lineage.snapshot}` : "–";
    return h("tr", { "data-version": v.id },
      h("th", { scope: "row" }, v.id, v.promoted ? h("span", { class: "ok" }, " (promoted)") : null),
      h("td", {}, v.created ? new Date(v.created).toLocaleString() : "–"),
      h("td", {}, v.strategy || "–"), h("td", {}, v.backbone || "–"), h("td", { class: "classes" }, classes(v.classes)),
      h("td", { class: "num" }, pct(m.val_accuracy)), h("td", { class: "num" }, fixed(m.macro_f1)),
      h("td", {}, lin), h("td", {}, v.parent || "–"),
      h("td", { class: "num" }, m.label_problems ?? "–"),
      h("td", {}, h("div", { class: "row" },
        h("button", { type: "button", onclick: () => showDetail(v.id, detail, ctx.signal), "aria-label": `Details of ${v.id}` }, "Details"),
        v.promoted ? null : h("button", { type: "button", class: "primary", "aria-label": `Promote ${v.id}`,
                                          onclick: () => act(ctx, main, v.id) }, "Promote"))));
  });
  return h("table", { id: "versions-table" },
    h("caption", { class: "muted" }, "Newest first"),
    h("thead", {}, h("tr", {}, ["Version", "Created", "Strategy", "Backbone", "Classes", "Val accuracy", "Macro F1",
                                "Dataset (lineage)", "Parent", "Label problems", ""].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows));
}

// A few class names say which classifier a version is; a long list (ImageNet's) only its length.
function classes(names) {
  if (!Array.isArray(names) || !names.length) return "–";
  return names.length <= 6 ? names.join(", ") : `${names.length} classes`;
}

function serving(listing) {
  if (!listing.serving || !listing.serving.length) return null;
  return h("details", {}, h("summary", {}, `What each worker serves (${listing.serving.length})`),
    h("table", {}, h("thead", {}, h("tr", {}, ["Replica", "Process", "Version", "Error"].map((t) => h("th", {}, t)))),
      h("tbody", {}, listing.serving.map((w) => h("tr", {}, h("td", {}, w.replica), h("td", {}, w.pid),
        h("td", {}, w.version || "–"), h("td", { class: "bad" }, w.error ? w.error.reason || JSON.stringify(w.error) : ""))))));
}

async function act(ctx, main, version) {
  const what = version ? `Promote ${version}? Every worker serves it within seconds.`
    : "Roll back to the version promoted before this one?";
  if (!(await confirmDialog(what, version ? `Promote ${version}` : "Roll back"))) return;
  try {
    const r = version ? await api("/promote", { json: { version, reason: "from the console" } })
      : await api("/rollback", { json: { reason: "from the console" } });
    await ctx.refreshServing();
    main.replaceChildren();
    await render(main, ctx);
    main.prepend(h("p", { class: "ok", role: "status" }, `Promoted ${r.promoted} (was ${r.previous || "none"}).`));
  } catch (e) {
    showError(e);
  }
}

// `signal`: the page's; a detail still loading when the page is left is dropped.
async function showDetail(id, box, signal) {
  box.replaceChildren(h("p", {}, `Loading ${id}…`));
  let v;
  try { v = await api(`/versions/${encodeURIComponent(id)}`, { signal }); } catch (e) { box.replaceChildren(); showError(e); return; }
  const per = v.per_class || {};
  const lp = v.label_problems || {};
  const nd = v.near_duplicates || {};
  put(box,
    h("h3", { tabindex: "-1", id: "detail-title" }, `${v.id}: ${v.strategy || ""} ${v.backbone || ""}`),
    h("p", {}, `Precision served: ${v.precision || "–"}. Parent: ${v.parent || "none"}. `,
      v.lineage && v.lineage.dataset ? `Trained on dataset ${v.lineage.dataset}, snapshot ${v.lineage.snapshot}. ` : "",
      v.promotion ? `Promotion decision: ${v.promotion.reason || JSON.stringify(v.promotion)}.` : "",
      v.note ? ` Note: ${v.note}` : ""),
    v.why ? h("p", { id: "version-why" }, `Strategy: ${v.why}.`) : null,
    v.balanced_accuracy != null ? h("p", { id: "balanced-accuracy" },
      `Validation accuracy ${fixed(v.metrics && v.metrics.val_accuracy)}, balanced accuracy (mean recall per class) `,
      `${fixed(v.balanced_accuracy)}`, v.balance ? `; class balancing ${v.balance.on ? "on" : "off"} (${v.balance.why})` : "", ".") : null,
    v.task === "multi_label" ? multiLabel(v) : Object.keys(per).length ? h("table", {}, h("caption", {}, "Per class (validation)"),
      h("thead", {}, h("tr", {}, ["Class", "Precision", "Recall", "F1", "Images"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, Object.entries(per).map(([c, m]) => h("tr", {}, h("th", { scope: "row" }, c),
        h("td", { class: "num" }, fixed(m.precision)), h("td", { class: "num" }, fixed(m.recall)),
        h("td", { class: "num" }, fixed(m.f1)), h("td", { class: "num" }, m.support)))))
      : h("p", { class: "muted" }, "No per-class figures for this version (not trained here)."),
    h("div", { class: "figs" },
      (v.files || []).includes("confusion_matrix.png")
        ? h("figure", {}, h("img", { id: "confusion", alt: `Confusion matrix of ${v.id}` }),
            h("figcaption", {}, "Confusion matrix (validation)")) : null,
      (v.files || []).includes("results.csv") ? h("figure", { id: "curves" }, h("figcaption", {}, "Per-epoch curves")) : null),
    problems(lp, nd));
  box.querySelector("#detail-title").focus();
  // Fetched with the token: another project's version files are guarded, and an <img src> cannot send it.
  const cm = box.querySelector("#confusion");
  if (cm) {
    try { cm.src = await imageURL(`/versions/${v.id}/files/confusion_matrix.png`, signal); } catch (e) {
      if (pageLeft(e)) return;
      showError(e);
    }
  }
  if ((v.files || []).includes("results.csv")) {
    try {
      const csv = await (await api(`/versions/${v.id}/files/results.csv`, { raw: true, signal })).text();
      box.querySelector("#curves").prepend(curves(csv));
    } catch (e) { showError(e); }
  }
}

// A multi-label version's figures, as training wrote them (any of them may be missing: read defensively).
function multiLabel(v) {
  const per = v.per_label && typeof v.per_label === "object" ? v.per_label : {};
  const th = v.thresholds || {};
  const summary = [["mAP", v.map], ["micro F1", v.micro_f1], ["macro F1", v.macro_f1],
                   ["subset accuracy", v.subset_accuracy]].filter(([, x]) => typeof x === "number");
  const names = Object.keys(per).length ? Object.keys(per) : Object.keys(th);
  const num = (x) => h("td", { class: "num" }, typeof x === "number" ? fixed(x) : "–");
  return h("section", {},
    h("p", { id: "multi-label-summary" }, "Multi-label version",
      summary.length ? `: ${summary.map(([k, x]) => `${k} ${fixed(x)}`).join(", ")}.` : "."),
    names.length ? h("table", { id: "per-label" }, h("caption", {}, "Per label (validation, each at its threshold)"),
      h("thead", {}, h("tr", {}, ["Label", "AP", "Precision", "Recall", "F1", "Threshold", "Positives"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, names.map((c) => {
        const m = per[c] && typeof per[c] === "object" ? per[c] : {};
        return h("tr", {}, h("th", { scope: "row" }, c), num(m.ap), num(m.precision), num(m.recall), num(m.f1),
          num(typeof m.threshold === "number" ? m.threshold : th[c]), h("td", { class: "num" }, m.support ?? "–"));
      })))
      : h("p", { class: "muted" }, "No per-label figures for this version."));
}

function problems(lp, nd) {
  if (lp.available === false) return h("p", { class: "muted" }, `Label problems: ${lp.reason}`);
  const items = lp.items || [];
  return h("section", {}, h("h4", {}, `Label problems: ${lp.count ?? items.length}`),
    items.length ? h("table", {}, h("thead", {}, h("tr", {}, ["Image", "Split", "Given", "Suggested", "Score"].map((t) => h("th", {}, t)))),
      h("tbody", {}, items.slice(0, 50).map((p) => h("tr", {}, h("td", {}, p.path), h("td", {}, p.split),
        h("td", {}, p.given), h("td", {}, p.suggested), h("td", { class: "num" }, fixed(p.score))))))
      : h("p", { class: "muted" }, lp.items_hidden ? `Images not listed: ${lp.items_hidden}.` : "None found."),
    h("p", { class: "muted" }, `Near-duplicates between training and validation: ${nd.count ?? (nd.items || []).length ?? "–"}`));
}

// results.csv (epoch, phase, time, train_loss, train_acc, val_loss, val_acc) as two small SVG line charts.
function curves(csv) {
  const [head, ...lines] = csv.trim().split(/\r?\n/);
  const cols = head.split(",");
  const rows = lines.map((l) => Object.fromEntries(l.split(",").map((x, i) => [cols[i], x])));
  const wrap = h("div", { class: "row" });
  for (const [title, keys] of [["accuracy", ["train_acc", "val_acc"]], ["loss", ["train_loss", "val_loss"]]]) {
    const W = 300, H = 160, P = 28;
    const ys = rows.flatMap((r) => keys.map((k) => Number(r[k]))).filter(Number.isFinite);
    if (!ys.length) continue;
    const lo = Math.min(...ys), hi = Math.max(...ys) === lo ? lo + 1 : Math.max(...ys);
    const x = (i) => P + (rows.length > 1 ? (i * (W - 2 * P)) / (rows.length - 1) : 0);
    const y = (v) => H - P - ((v - lo) * (H - 2 * P)) / (hi - lo);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("width", W); svg.setAttribute("height", H);
    svg.setAttribute("class", "curves"); svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `${title} per epoch: ${keys.map((k) => `${k} ${rows.map((r) => Number(r[k]).toFixed(3)).join(", ")}`).join("; ")}`);
    const colours = ["#0a58ca", "#d9480f"];
    keys.forEach((k, j) => {
      const pts = rows.map((r, i) => `${x(i)},${y(Number(r[k]))}`).join(" ");
      const pl = document.createElementNS(ns, "polyline");
      pl.setAttribute("points", pts); pl.setAttribute("fill", "none"); pl.setAttribute("stroke", colours[j]);
      pl.setAttribute("stroke-width", "2"); svg.append(pl);
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", P + j * 90); t.setAttribute("y", 12); t.setAttribute("fill", colours[j]); t.textContent = k;
      svg.append(t);
    });
    for (const [v, yy] of [[hi, y(hi)], [lo, y(lo)]]) {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", 0); t.setAttribute("y", yy + 4); t.textContent = v.toFixed(2); svg.append(t);
    }
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", W / 2 - 20); t.setAttribute("y", H - 6); t.textContent = `epochs (${rows.length})`;
    svg.append(t);
    wrap.append(svg);
  }
  return wrap;
}
