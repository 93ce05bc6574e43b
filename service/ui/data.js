// Data: the store's datasets with counts per class and thumbnails, captured images to label next (suggest)
// with one-click labels that send POST /feedback, and drift per served version.
import { ApiError, api, fixed, h, imageURL, pageLeft, showError } from "./api.js";

const THUMBS_PER_CLASS = 6;

// `signal` (ctx's) is aborted when the page is left: every read below takes it, so a left page stops.
export async function render(main, { signal }) {
  const list = await api("/datasets", { signal });
  main.append(h("h2", {}, "Data"));
  if (!list.length) main.append(h("p", { class: "muted" }, "No datasets yet: a retrain upload, or images added to a dataset, makes one."));
  for (const d of list) main.append(await dataset(d.dataset, signal));
  main.append(await drift(signal));
}

async function dataset(name, signal) {
  const d = await api(`/datasets/${encodeURIComponent(name)}`, { signal });
  const sec = h("section", { class: "dataset", "data-dataset": name }, h("h3", {}, `${name}: ${d.images} images`),
    h("p", { class: "muted" }, `Snapshot ${d.snapshot}; split hints: `,
      Object.entries(d.splits || {}).map(([k, v]) => `${k} ${v}`).join(", "),
      d.task === "multi_label" ? `; multi-label: images per label, ${d.negatives} with none of them` : ""));
  const thumbs = h("div", {});
  sec.append(h("table", {}, h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Class"), h("th", { scope: "col" }, "Images"))),
    h("tbody", {}, Object.entries(d.classes).map(([c, n]) => h("tr", {}, h("th", { scope: "row" }, c), h("td", { class: "num" }, n))))),
  thumbs);
  thumbnails(name, d.snapshot, thumbs, signal);
  const suggestBox = h("div", { class: "suggest" });
  sec.append(h("h4", {}, "To label next"),
    h("button", { type: "button", onclick: () => suggest(name, Object.keys(d.classes), suggestBox, signal) }, `Suggest images for ${name}`),
    suggestBox);
  return sec;
}

// A few images per class, fetched with the token (image bytes are guarded as captured images are).
async function thumbnails(name, snapshot, box, signal) {
  try {
    const m = await api(`/datasets/${encodeURIComponent(name)}/snapshots/${snapshot}`, { signal });
    const byClass = {};
    // A multi-label entry shows under each of its labels, or under "none of the labels" for a negative.
    const NONE = "(none of the labels)";
    for (const e of m.entries) {
      const labels = Array.isArray(e.labels) ? (e.labels.length ? e.labels : [NONE]) : [e.label];
      for (const l of labels) (byClass[l] ||= []).length < THUMBS_PER_CLASS && byClass[l].push(e);
    }
    for (const [label, entries] of Object.entries(byClass)) {
      const row = h("div", { class: "thumbs", "aria-label": `Images of ${label}`, role: "group" });
      box.append(h("p", {}, label), row);
      for (const e of entries) {
        const url = await imageURL(`/datasets/${encodeURIComponent(name)}/images/${e.sha256}`, signal);
        row.append(h("img", { src: url, alt: `${label}: ${e.name || e.sha256.slice(0, 12)}` }));
      }
    }
  } catch (e) {
    if (pageLeft(e)) return;
    box.append(h("p", { class: "muted" }, `Thumbnails: ${e.message}`));
  }
}

async function suggest(name, classes, box, signal) {
  box.replaceChildren(h("p", {}, "Asking the model…"));
  let r;
  try { r = await api(`/datasets/${encodeURIComponent(name)}/suggest?n=12`, { signal }); } catch (e) {
    if (pageLeft(e)) return;
    box.replaceChildren(h("p", { class: "bad" }, e.message)); showError(e); return;
  }
  box.replaceChildren(h("p", { class: "muted" }, `${r.suggestions.length} of ${r.candidates} captured images, ranked by ${r.ranked_by} (model ${r.version}).`));
  const cards = h("div", { class: "cards" });
  box.append(cards);
  for (const s of r.suggestions) {
    const card = h("article", { class: "card" }, h("p", {}, `${s.name}: predicted ${s.predicted} (margin ${fixed(s.margin)})`));
    cards.append(card);
    try { card.prepend(h("img", { src: await imageURL(s.image, signal), alt: `Captured image ${s.name}` })); } catch (e) {
      if (pageLeft(e)) return;
      card.append(h("p", { class: "bad" }, e.message));
    }
    if (Array.isArray(s.labels)) { card.append(severalLabels(name, s, classes, card)); continue; }
    card.append(h("div", { class: "row", role: "group", "aria-label": `Label ${s.name}` }, classes.map((c) =>
      h("button", { type: "button", onclick: async () => {
        try {
          const f = await api("/feedback", { json: { prediction_id: s.prediction_id, label: c, dataset: name } });
          card.replaceChildren(h("p", { class: "ok", role: "status" }, `${s.name} labelled ${f.label}: snapshot ${f.snapshot}${f.relabelled ? " (relabelled)" : ""}.`));
        } catch (e) { showError(e); }
      } }, `${c}`))));
  }
}

// A multi-label version's capture: a checkbox per label (the ones it answered ticked) and one send; none
// ticked says the image has none of them.
function severalLabels(name, s, classes, card) {
  const given = new Set(s.labels.map((x) => x.label));
  const all = [...new Set([...classes, ...s.top_k.map((t) => t.label), ...given])];
  const boxes = all.map((c, i) => {
    const id = `fb-${s.prediction_id}-${i}`;
    return h("label", { for: id }, h("input", { type: "checkbox", id, value: c, checked: given.has(c) }), ` ${c}`);
  });
  const send = h("button", { type: "button", class: "primary", onclick: async () => {
    const labels = boxes.map((b) => b.querySelector("input")).filter((x) => x.checked).map((x) => x.value);
    try {
      const f = await api("/feedback", { json: { prediction_id: s.prediction_id, labels, dataset: name } });
      card.replaceChildren(h("p", { class: "ok", role: "status" },
        `${s.name} labelled ${f.labels.join(", ") || "none of the labels"}: snapshot ${f.snapshot}${f.relabelled ? " (relabelled)" : ""}.`));
    } catch (e) {
      showError(e);
    }
  } }, "Send labels");
  return h("fieldset", { class: "row", "aria-label": `Labels of ${s.name}` },
    h("legend", {}, "Every label it has (none ticked: none of them)"), boxes, send);
}

async function drift(signal) {
  const sec = h("section", { id: "drift" }, h("h3", {}, "Drift per version"));
  try {
    const r = await api("/drift", { signal });
    sec.append(h("table", {}, h("thead", {}, h("tr", {}, ["Version", "Inputs seen", "Embedding score / threshold",
      "Labels score / threshold", "Flagged"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, r.versions.map((v) => v.available
        ? h("tr", {}, h("th", { scope: "row" }, v.version), h("td", { class: "num" }, `${v.window_fill} of ${v.window_size}`),
            h("td", { class: "num" }, `${fixed(v.embedding.score)} / ${fixed(v.embedding.threshold)}`),
            h("td", { class: "num" }, `${fixed(v.labels.score)} / ${fixed(v.labels.threshold)}`),
            h("td", { class: v.flagged ? "bad" : "ok" }, v.flagged ? "yes" : v.window_fill >= v.min_fill ? "no" : `no (from ${v.min_fill} inputs)`))
        : h("tr", {}, h("th", { scope: "row" }, v.version), h("td", { colspan: 4, class: "muted" }, v.reason))))));
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    sec.append(h("p", { class: "bad" }, e.message));
  }
  return sec;
}
