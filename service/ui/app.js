// The console's shell: pages by URL hash (#try, #versions, #retrain, #data), the token form, and the
// promoted version shown on every page.
import { api, clearError, pageLeft, setToken, showError, token } from "./api.js";
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

function tokenForm() {
  const input = document.getElementById("token");
  const state = document.getElementById("token-state");
  const say = () => { state.textContent = token() ? "token set for this tab" : "no token"; };
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken(input.value.trim());
    input.value = "";
    say();
    show();
  });
  document.getElementById("token-forget").addEventListener("click", () => { setToken(""); say(); show(); });
  say();
}

window.addEventListener("hashchange", show);
tokenForm();
show();
