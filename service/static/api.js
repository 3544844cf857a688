// The JSON API, with the operator's token. The only file that talks to the server.
"use strict";

const TOKEN_KEY = "tdx.dashboard.token";
export const PAGE_SIZE = 500;

export class HttpError extends Error {
  constructor(status, problem) {
    const detail = problem && typeof problem.detail === "string" ? problem.detail : "";
    super(`HTTP ${status}${detail ? ": " + detail : ""}`);
    this.status = status;
    this.code = problem && typeof problem.code === "string" ? problem.code : `http_${status}`;
    this.problem = problem;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// A link like /dashboard#token=... (for scripts and headless browsers): read once, kept in
// session storage, and taken out of the address bar and the history.
export function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (!params.has("token")) return;
  const value = params.get("token").trim();
  if (value) setToken(value);
  history.replaceState(null, "", location.pathname + location.search);
}

// One call: {body, etag}. GET reads; PATCH (admin actions) sends JSON with If-Match.
async function call(method, path, { params, body, ifMatch, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(params || {})) {
    if (value === undefined || value === null || value === "") continue;
    for (const one of Array.isArray(value) ? value : [value]) url.searchParams.append(key, String(one));
  }
  const headers = { Authorization: `Bearer ${token()}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (ifMatch) headers["If-Match"] = ifMatch;
  const response = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
    signal,
  });
  if (!response.ok) {
    let problem = null;
    try {
      problem = await response.json();
    } catch (_) {
      problem = null;
    }
    throw new HttpError(response.status, problem);
  }
  return { body: await response.json(), etag: response.headers.get("ETag") };
}

export async function get(path, params, signal) {
  return (await call("GET", path, { params, signal })).body;
}

// A GET that also returns the ETag, to send back as If-Match.
export function getTagged(path, signal) {
  return call("GET", path, { signal });
}

export function patch(path, body, ifMatch, signal) {
  return call("PATCH", path, { body, ifMatch, signal });
}

// Follows `next` up to maxPages; `truncated` says there was more.
export async function getAll(path, params, maxPages, signal) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < maxPages; page++) {
    const body = await get(path, { ...params, limit: PAGE_SIZE, cursor }, signal);
    items.push(...body.items);
    cursor = body.next;
    if (!cursor) return { items, truncated: false };
  }
  return { items, truncated: true };
}

export function hostPath(name) {
  return `/v1/hosts/${encodeURIComponent(name)}`;
}
