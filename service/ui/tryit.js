// Try it: drop or pick images; each goes to POST /explain, which answers what /predict would (top-k, the
// version that answered) plus the class activation map as a PNG overlay. The threshold slider applies the
// API's rule (the label is "unknown" when the top score is under it) to the answers already here.
// A multi-label version answers a set of labels: its answers show them as chips, and one slider per label
// (starting at the version's own thresholds) re-filters them here, from every label's score (top_k = all).
import { api, h, pct, put, showError } from "./api.js";

let threshold = 0;
const results = []; // {name, url, answer, note}
let multi = null; // the multi-label version answering: {version, labels, cuts: {label: threshold}}; else null

export async function render(main, { signal }) {
  results.length = 0;
  const input = h("input", { id: "files", type: "file", accept: "image/*", multiple: true, class: "visually-hidden" });
  const drop = h("label", { for: "files", class: "drop", id: "drop" },
    "Drop images here, or choose files (Enter or Space)", input);
  const topk = h("input", { id: "topk", type: "number", min: 1, max: 20, value: 5, size: 3 });
  const out = h("output", { id: "threshold-value", for: "threshold" }, threshold.toFixed(2));
  const slider = h("input", { id: "threshold", type: "range", min: 0, max: 1, step: 0.01, value: threshold,
                              "aria-describedby": "threshold-help" });
  const cards = h("div", { class: "cards", id: "results", "aria-live": "polite" });
  const single = h("div", { id: "single-options" },
    h("div", { class: "row" },
      h("label", { for: "topk" }, "Top classes shown"), topk,
      h("label", { for: "threshold" }, "Threshold"), slider, out),
    h("p", { id: "threshold-help", class: "muted" },
      "An answer whose top score is under the threshold is shown as “unknown”, as /predict answers with ",
      h("code", {}, "threshold"), "."));
  const perLabel = h("fieldset", { id: "label-thresholds", hidden: true });
  const ui = { single, perLabel };
  slider.addEventListener("input", () => {
    threshold = Number(slider.value);
    out.textContent = threshold.toFixed(2);
    for (const r of results) draw(r);
  });
  const send = (files) => classify(files, () => (multi ? multi.labels.length : Number(topk.value)), cards, ui, signal);
  input.addEventListener("change", () => { send([...input.files]); input.value = ""; });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    send([...ev.dataTransfer.files].filter((f) => f.type.startsWith("image/")));
  });
  main.append(h("h2", {}, "Try it"), drop, single, perLabel, cards);
  try {
    const listing = await api("/versions", { signal });
    if (listing.promoted) await useVersion(listing.promoted, ui, signal);
  } catch (e) { showError(e); }
}

// The options for the version that answers: one threshold slider for a single-label version, one per label,
// at its thresholds, for a multi-label one (GET /versions/{id}: `task`, `thresholds`).
async function useVersion(version, ui, signal) {
  const d = await api(`/versions/${encodeURIComponent(version)}`, { signal });
  const labels = Array.isArray(d.classes) ? d.classes : Object.keys(d.thresholds || {});
  multi = d.task === "multi_label" && labels.length
    ? { version, labels, cuts: Object.fromEntries(labels.map((l) => [l, (d.thresholds || {})[l] ?? 0.5])) } : null;
  ui.single.hidden = Boolean(multi);
  ui.perLabel.hidden = !multi;
  if (!multi) { ui.perLabel.replaceChildren(); return; }
  put(ui.perLabel, h("legend", {}, `Thresholds per label (${version}; each starts at the version's own)`),
    multi.labels.map((label, i) => {
      const out = h("output", { for: `label-threshold-${i}` }, multi.cuts[label].toFixed(2));
      const s = h("input", { id: `label-threshold-${i}`, type: "range", min: 0, max: 1, step: 0.01,
                             value: multi.cuts[label], "data-label": label });
      s.addEventListener("input", () => {
        multi.cuts[label] = Number(s.value);
        out.textContent = multi.cuts[label].toFixed(2);
        for (const r of results) draw(r);
      });
      return h("div", { class: "row" }, h("label", { for: s.id }, label), s, out);
    }),
    h("p", { class: "muted" }, "A label is shown when its score is at or over its threshold, as /predict ",
      "answers; a request's ", h("code", {}, "threshold"), " would hold for every label."));
}

// `signal`: the page's; once it is left, the answers still on their way are dropped and the rest not asked.
async function classify(files, topK, cards, ui, signal) {
  for (const file of files) {
    if (signal.aborted) return;
    const { answer: a } = await answer(file, topK(), cards, signal);
    // Another version answered (a promotion since the page opened): its options replace these.
    if (a && (a.labels ? !multi || multi.version !== a.version : multi)) {
      try { await useVersion(a.version, ui, signal); } catch (e) { showError(e); }
      for (const r of results) draw(r);
    }
  }
}

// One image to POST /explain (POST /predict for a version without the feature map), drawn as its card.
async function answer(file, topK, cards, signal) {
  const r = { name: file.name, url: URL.createObjectURL(file), answer: null, note: "working…", card: h("article", { class: "card" }) };
  results.push(r);
  cards.prepend(r.card);
  draw(r);
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("top_k", String(topK || 5));
  try {
    r.answer = await api("/explain", { form, signal });
    r.note = "";
  } catch (e) {
    if (e.status === 409) {
      // A version exported without the feature map: the answer still, without the map.
      const f2 = new FormData();
      f2.append("images", file, file.name);
      f2.append("top_k", String(topK || 5));
      try {
        [r.answer] = await api("/predict", { form: f2, signal });
        r.note = `No heatmap: ${e.message}`;
      } catch (e2) { r.note = e2.message; showError(e2); }
    } else {
      r.note = e.message;
      showError(e);
    }
  }
  draw(r);
  return r;
}

// A multi-label answer's labels under the sliders' thresholds (the API's own `labels` until they are known).
function chosen(a) {
  if (!multi || multi.version !== a.version) return a.labels;
  return a.top_k.filter((t) => t.score >= (multi.cuts[t.label] ?? 1)).sort((x, y) => y.score - x.score);
}

function chips(items) {
  return h("ul", { class: "chips", "data-testid": "labels", "aria-label": "Labels" },
    items.length ? items.map((t) => h("li", { class: "chip", "data-label": t.label }, `${t.label} ${pct(t.score)}`))
      : h("li", { class: "muted" }, "none of the labels"));
}

function draw(r) {
  const a = r.answer;
  const set = a && a.labels ? chosen(a) : null;
  const label = a && (set ? (set.length ? set[0].label : "unknown") : a.score < threshold ? "unknown" : a.label);
  const score = a && (set ? (set.length ? set[0] : a.top_k[0]).score : a.score);
  const images = h("div", { class: "images" },
    h("img", { src: r.url, alt: `Uploaded image ${r.name}` }),
    a && a.overlay_png ? h("img", { class: "heatmap", src: `data:image/png;base64,${a.overlay_png}`,
                                   alt: `Heatmap: where the model looked for “${a.explained}”` }) : null);
  put(r.card,
    h("h3", {}, r.name),
    images,
    a ? h("p", {}, h("span", { class: `answer${label === "unknown" ? " unknown" : ""}`, "data-testid": "answer" }, label),
          " ", h("span", { class: "muted" }, `score ${pct(score)} · answered by `),
          h("strong", { class: "answered-by" }, a.version)) : null,
    set ? chips(set) : null,
    a && a.explained ? h("p", { class: "muted" }, `Heatmap for “${a.explained}”; peak at `,
                         `${Math.round(100 * a.peak.x)} %, ${Math.round(100 * a.peak.y)} % of the crop`) : null,
    a ? h("ul", { class: "bars", "aria-label": "Top classes" }, a.top_k.map((t) => h("li", {},
      h("span", {}, t.label),
      h("span", { class: "bar", role: "img", "aria-label": `${t.label} ${pct(t.score)}` },
        h("span", { style: `width:${(100 * t.score).toFixed(1)}%` })),
      h("span", { class: "num" }, pct(t.score))))) : null,
    r.note ? h("p", { class: r.answer ? "muted" : "bad" }, r.note) : null);
}
