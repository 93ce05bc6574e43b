// Try it: drop or pick images; each goes to POST /explain, which answers what /predict would (top-k, the
// version that answered) plus the class activation map as a PNG overlay. The threshold slider applies the
// API's rule (the label is "unknown" when the top score is under it) to the answers already here.
import { api, h, pct, put, showError } from "./api.js";

let threshold = 0;
const results = []; // {name, url, answer, note}

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
  slider.addEventListener("input", () => {
    threshold = Number(slider.value);
    out.textContent = threshold.toFixed(2);
    for (const r of results) draw(r);
  });
  input.addEventListener("change", () => { classify([...input.files], Number(topk.value), cards, signal); input.value = ""; });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    classify([...ev.dataTransfer.files].filter((f) => f.type.startsWith("image/")), Number(topk.value), cards, signal);
  });
  main.append(
    h("h2", {}, "Try it"),
    drop,
    h("div", { class: "row" },
      h("label", { for: "topk" }, "Top classes shown"), topk,
      h("label", { for: "threshold" }, "Threshold"), slider, out),
    h("p", { id: "threshold-help", class: "muted" },
      "An answer whose top score is under the threshold is shown as “unknown”, as /predict answers with ",
      h("code", {}, "threshold"), "."),
    cards);
}

// `signal`: the page's; once it is left, the answers still on their way are dropped and the rest not asked.
async function classify(files, topK, cards, signal) {
  for (const file of files) {
    if (signal.aborted) return;
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
  }
}

function draw(r) {
  const a = r.answer;
  const label = a && (a.score < threshold ? "unknown" : a.label);
  const images = h("div", { class: "images" },
    h("img", { src: r.url, alt: `Uploaded image ${r.name}` }),
    a && a.overlay_png ? h("img", { class: "heatmap", src: `data:image/png;base64,${a.overlay_png}`,
                                   alt: `Heatmap: where the model looked for “${a.explained}”` }) : null);
  put(r.card,
    h("h3", {}, r.name),
    images,
    a ? h("p", {}, h("span", { class: `answer${label === "unknown" ? " unknown" : ""}`, "data-testid": "answer" }, label),
          " ", h("span", { class: "muted" }, `score ${pct(a.score)} · answered by `),
          h("strong", { class: "answered-by" }, a.version)) : null,
    a && a.explained ? h("p", { class: "muted" }, `Heatmap for “${a.explained}”; peak at `,
                         `${Math.round(100 * a.peak.x)} %, ${Math.round(100 * a.peak.y)} % of the crop`) : null,
    a ? h("ul", { class: "bars", "aria-label": "Top classes" }, a.top_k.map((t) => h("li", {},
      h("span", {}, t.label),
      h("span", { class: "bar", role: "img", "aria-label": `${t.label} ${pct(t.score)}` },
        h("span", { style: `width:${(100 * t.score).toFixed(1)}%` })),
      h("span", { class: "num" }, pct(t.score))))) : null,
    r.note ? h("p", { class: r.answer ? "muted" : "bad" }, r.note) : null);
}
