// Talking to the Refit API: the chosen project (every call goes to its routes), its bearer token (kept in this
// tab's session storage only, one per project), JSON and multipart requests, and errors shown as the API words them.

export const DEFAULT = "default";

// The project is in the page's address (`?project=NAME`; none for the default project), so a reload or a
// bookmark stays on it and two tabs can show two projects.
export function project() { return new URLSearchParams(location.search).get("project") || DEFAULT; }
export function setProject(name) {
  const url = new URL(location.href);
  if (name === DEFAULT) url.searchParams.delete("project"); else url.searchParams.set("project", name);
  history.replaceState(null, "", url);
}

// The one place a route becomes a URL: `path` as the default project has it ("/versions"), under
// /projects/NAME/ for any other project. `admin`: the project admin routes (/projects...), under no project.
export function route(path, admin = false) {
  const p = project();
  return admin || p === DEFAULT ? path : `/projects/${encodeURIComponent(p)}${path}`;
}

// A project's token opens that project only, so each project keeps its own. One without its own uses the
// default's, which is the admin token where there is one: the admin types it once for every project.
const tokenKey = (p) => `refit.token.${p}`;
export function ownToken(p = project()) { return sessionStorage.getItem(tokenKey(p)) || ""; }
export function token(p = project()) { return ownToken(p) || ownToken(DEFAULT); }
export function setToken(value, p = project()) {
  if (value) sessionStorage.setItem(tokenKey(p), value); else sessionStorage.removeItem(tokenKey(p));
}

export class ApiError extends Error {
  constructor(status, message, body) { super(message); this.status = status; this.body = body; }
}

// A page that is left aborts its AbortSignal (app.js): its reads are cancelled and their answers dropped, and
// what it still awaits rejects with this error, which no page shows. Writes (feedback, promote, rollback, retrain)
// are sent without the signal: what a person asked for is finished by the server, and only its answer is dropped.
export function pageLeft(e) { return Boolean(e) && e.name === "AbortError"; }
function leftError(signal) { return signal.reason || new DOMException("the page was left", "AbortError"); }

// fetch() of `path` for the chosen project (route()), with its token; `admin`: a project admin route, with the
// default's (admin) token. `json` sends a JSON body, `form` a FormData. Answers the parsed JSON (or the Response
// itself with raw: true); any status >= 400 throws an ApiError whose message is the API's own `error` text.
// `signal`: the page's; once it is aborted the request is cancelled (or never sent) and nothing is answered.
export async function api(path, { method, json, form, raw = false, signal, admin = false } = {}) {
  if (signal && signal.aborted) throw leftError(signal);
  const headers = {};
  const bearer = admin ? token(DEFAULT) : token();
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  let resp;
  try {
    resp = await fetch(route(path, admin), { method: method || (body ? "POST" : "GET"), headers, body, signal });
  } catch (e) {
    if (pageLeft(e)) throw e;
    throw new ApiError(0, `the server could not be reached (${e.message})`);
  }
  if (resp.status >= 400) {
    const text = await resp.text();
    if (signal && signal.aborted) throw leftError(signal);
    let data = null;
    try { data = JSON.parse(text); } catch { /* not JSON: shown as it came */ }
    const msg = data && typeof data.error === "string" ? data.error
      : data && data.detail ? JSON.stringify(data.detail) : text || resp.statusText;
    throw new ApiError(resp.status, `${resp.status}: ${msg}`, data);
  }
  if (raw) return resp;
  const data = await resp.json();
  if (signal && signal.aborted) throw leftError(signal);
  return data;
}

// An image the API guards with the token (a dataset's, a captured one): fetched with the header, shown from
// a blob URL, since an <img src> cannot send it.
export async function imageURL(path, signal) {
  const resp = await api(path, { raw: true, signal });
  const blob = await resp.blob();
  if (signal && signal.aborted) throw leftError(signal);
  return URL.createObjectURL(blob);
}

// The page-wide message area: errors from the API, word for word (not a left page's, which are not errors).
export function showError(e) {
  if (pageLeft(e)) return;
  const box = document.getElementById("error");
  box.textContent = e instanceof ApiError || e instanceof Error ? e.message : String(e);
  box.hidden = false;
}
export function clearError() {
  const box = document.getElementById("error");
  box.textContent = "";
  box.hidden = true;
}

// h("button", {type: "button", onclick: f}, "text", child...): a small element builder, so no page writes
// HTML from strings (API text is always set as text, never parsed).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "style") el.style.cssText = v; // through CSSOM: the page's CSP refuses style attributes
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// el.replaceChildren(...) without the absent parts (null, undefined, false), which the DOM would print.
export function put(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
export const fixed = (x, n = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(n));

// Ask before doing something that changes what is served; a native <dialog>, so focus and Escape work.
export function confirmDialog(message, okText) {
  return new Promise((resolve) => {
    const ok = h("button", { type: "submit", value: "ok", class: "primary" }, okText);
    const dlg = h("dialog", { "aria-labelledby": "confirm-text" },
      h("form", { method: "dialog" }, h("p", { id: "confirm-text" }, message),
        h("div", { class: "row" }, ok, h("button", { type: "submit", value: "cancel" }, "Cancel"))));
    dlg.addEventListener("close", () => { dlg.remove(); resolve(dlg.returnValue === "ok"); });
    document.body.append(dlg);
    dlg.showModal();
    ok.focus();
  });
}
