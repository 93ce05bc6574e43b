// The console's shell: pages by URL hash (#try, #versions, #retrain, #data), the project picker, the token
// form (one token per project), and the promoted version shown on every page.
import { DEFAULT, api, clearError, h, ownToken, pageLeft, project, put, setProject, setToken, showError, token } from "./api.js";
import * as tryit from "./tryit.js";
import * as versions from "./versions.js";
import * as retrain from "./retrain.js";
import * as data from "./data.js";

const PAGES = { try: tryit, versions, retrain, data };

// The version the server promotes now, in the header of every page; pages call it after a change.
export async function refreshServing(signal) {
  const out = document.getElementById("promoted");
  try {
    const v = await api("/versions", { signal });
    out.textContent = v.promoted || (v.problem ? `none (${v.problem})` : "none");
  } catch (e) {
    if (pageLeft(e)) return;
    out.textContent = "unknown";
    showError(e);
  }
}

// The page on screen: its render's AbortController, aborted when another page is shown.
let current = null;

// A fresh <main> for each page render: a left page that still holds its old one writes off screen, and its
// listeners go with it; its reads are aborted through the signal in ctx (api.js), so it stops at its next await.
function freshMain(name) {
  const old = document.getElementById("page");
  const main = old.cloneNode(false);
  main.dataset.page = name;
  old.replaceWith(main);
  return main;
}

async function show() {
  const name = location.hash.slice(1) in PAGES ? location.hash.slice(1) : "try";
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === `#${name}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (current) current.abort();
  current = new AbortController();
  const { signal } = current;
  clearError();
  const main = freshMain(name);
  const ctx = { signal, refreshServing: () => refreshServing(signal) };
  ctx.refreshServing();
  try {
    await PAGES[name].render(main, ctx);
  } catch (e) {
    showError(e);
  }
}

function sayToken() {
  const p = project();
  document.getElementById("token-state").textContent = ownToken(p) ? `token set for ${p}`
    : token(p) ? `no token for ${p}: the default's is used` : "no token";
}

function tokenForm() {
  const input = document.getElementById("token");
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken(input.value.trim());
    input.value = "";
    sayToken();
    if (project() === DEFAULT) listProjects(); // the admin token lists the projects
    show();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    setToken("");
    sayToken();
    if (project() === DEFAULT) listProjects();
    show();
  });
  sayToken();
}

// The picker: the projects GET /projects lists (the admin token's), else the default and the one open now;
// a name can always be typed, so a person holding only a project's token can open their project.
async function listProjects() {
  const select = document.getElementById("project");
  const state = document.getElementById("project-state");
  let names = [DEFAULT];
  try {
    names = (await api("/projects", { admin: true })).projects.map((p) => p.name);
    state.textContent = "";
  } catch (e) {
    state.textContent = e.status === 401 || e.status === 403 ? "listing the projects needs the admin token"
      : `the projects cannot be listed (${e.message})`;
  }
  if (!names.includes(project())) names.push(project());
  put(select, names.map((n) => h("option", { value: n }, n)));
  select.value = project();
}

function openProject(name) {
  setProject(name);
  if (![...document.getElementById("project").options].some((o) => o.value === name)) listProjects();
  document.getElementById("project").value = name;
  document.getElementById("project-state").textContent = "";
  sayToken();
  show();
}

// Create: PUT /projects/{name} with the admin token. Its token is answered this once: shown, and kept as the
// new project's token for this tab.
async function createProject(name) {
  const state = document.getElementById("project-state");
  try {
    const r = await api(`/projects/${encodeURIComponent(name)}`, { method: "PUT", admin: true });
    if (r.token) setToken(r.token, name);
    await listProjects();
    openProject(name);
    put(state, r.token ? [`created ${name}; its token, shown this once: `, h("code", { id: "new-token" }, r.token)]
      : `${name} exists already`);
  } catch (e) {
    showError(e);
  }
}

function projectForm() {
  const form = document.getElementById("project-form");
  const typed = document.getElementById("project-name");
  document.getElementById("project").addEventListener("change", (ev) => openProject(ev.target.value));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (typed.value.trim()) openProject(typed.value.trim());
    typed.value = "";
  });
  document.getElementById("project-create").addEventListener("click", () => {
    if (!typed.value.trim() || !form.reportValidity()) return;
    createProject(typed.value.trim());
    typed.value = "";
  });
  listProjects();
}

window.addEventListener("hashchange", show);
projectForm();
tokenForm();
show();
