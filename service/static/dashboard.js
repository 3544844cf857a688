// The dashboard: signs in with a token, asks the server what the token may do (GET /v1/whoami),
// and shows one page at a time, chosen by the address's fragment:
//   #/              overview (fleet tiles, hosts, pending VMs, live events)
//   #/hosts/NAME    one host, with cordon / uncordon / drain for an admin token
//   #/vms?...       every VM, filtered by project, status and host
//   #/projects      every project's quota: used/limit per resource
//   #/events?...    the event log, page by page
// A page is a module with mount(container, params, app); adding one is a route below and a link
// in index.html's nav.
"use strict";

import { forgetToken, get, setToken, takeTokenFromFragment, token, HttpError } from "./api.js";
import { $, clock } from "./dom.js";
import * as events from "./events.js";
import * as hostPage from "./host-page.js";
import * as overview from "./overview.js";
import * as projects from "./projects.js";
import * as vmList from "./vm-list.js";

const ROUTES = [
  { pattern: /^\/?$/, page: overview, nav: "overview" },
  { pattern: /^\/hosts\/([^/?]+)$/, page: hostPage, nav: "overview", names: ["name"] },
  { pattern: /^\/vms$/, page: vmList, nav: "vms" },
  { pattern: /^\/projects$/, page: projects, nav: "projects" },
  { pattern: /^\/events$/, page: events, nav: "events" },
];

let session = null; // {role, token_id, ...} from /v1/whoami
let current = null; // the shown page's AbortController

function feedStatus(state, text) {
  const node = $("feed-status");
  node.dataset.state = state;
  node.textContent = text;
}

function refused(error) {
  if (error instanceof HttpError && error.status === 401) {
    signOut("The server refused this token (401). Enter another one.");
    return true;
  }
  return false;
}

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?", 2);
  const params = new URLSearchParams(query || "");
  for (const r of ROUTES) {
    const match = r.pattern.exec(path);
    if (!match) continue;
    (r.names || []).forEach((key, i) => params.set(key, decodeURIComponent(match[i + 1])));
    return { ...r, params };
  }
  return { ...ROUTES[0], params };
}

function show() {
  if (!session) return;
  if (current) current.abort();
  current = new AbortController();
  const { page, params, nav } = route();
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === nav);
  }
  feedStatus("idle", page === overview ? "connecting" : "");
  const app = {
    role: session.role,
    signal: current.signal,
    refused,
    feedStatus,
    navigate: (hash) => {
      if (location.hash === hash) show();
      else location.hash = hash;
    },
    stamp: () => {
      $("updated").textContent = `updated ${clock()}`;
    },
  };
  page.mount($("view"), params, app);
}

async function signIn() {
  $("login").hidden = true;
  $("forget").hidden = false;
  try {
    session = await get("/v1/whoami");
  } catch (error) {
    if (!refused(error)) signOut(`Could not ask the server who this token is: ${error.message}`);
    return;
  }
  const who = session.role + (session.project ? ` · ${session.project}` : "") + (session.host ? ` · ${session.host}` : "");
  $("whoami").textContent = who;
  $("whoami").title = `token ${session.token_id}`;
  $("nav").hidden = false;
  $("view").hidden = false;
  show();
}

function signOut(message) {
  forgetToken();
  session = null;
  if (current) current.abort();
  current = null;
  $("view").replaceChildren();
  $("view").hidden = true;
  $("nav").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  $("updated").textContent = "";
  $("whoami").textContent = "";
  feedStatus("idle", "not connected");
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("token-input").value = "";
  $("token-input").focus();
}

function start() {
  takeTokenFromFragment();
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    setToken(value);
    $("token-input").value = "";
    signIn();
  });
  $("forget").addEventListener("click", () => signOut(null));
  window.addEventListener("hashchange", show);
  if (token()) signIn();
  else signOut(null);
}

start();
