// Events: one line per event, for the live feed (overview) and the paged log (#/events).
"use strict";

import { get } from "./api.js";
import { clock, el, fromTemplate, link, note, showError } from "./dom.js";
import { hostHref } from "./columns.js";

const EVENT_DATA_CHARS = 160;
export const EVENTS_PAGE = 50;
const MAX_STEPS_BACK = 20; // requests per "Older" click when a filter leaves windows empty

function dataSummary(event) {
  return Object.entries(event.data || {})
    .filter(([key, value]) => !(key === "id" && value === event.subject))
    .map(([key, value]) => `${key}=${typeof value === "string" ? value : JSON.stringify(value)}`)
    .join("  ");
}

// full: the date too (older pages of the log), not only the time of day (the live feed).
export function eventItem(event, full) {
  const item = el("li", "event");
  item.dataset.id = String(event.id);
  const when = el("span", "event-time", full ? event.at.slice(0, 19).replace("T", " ") : clock(event.at));
  when.title = `#${event.id} at ${event.at}`;
  const family = event.kind.split(".")[0];
  const kind = el("span", `event-kind kind-${family === "host" || family === "vm" ? family : "other"}`, event.kind);
  if (/(lost|failed|stale|unschedulable)$/.test(event.kind)) kind.classList.add("kind-bad");
  const subject = family === "host" ? link(hostHref(event.subject), event.subject) : el("span", null, event.subject);
  subject.classList.add("event-subject");
  item.append(el("span", "event-id", `#${event.id}`), when, kind, subject);
  const details = dataSummary(event);
  if (details) {
    const text = details.length > EVENT_DATA_CHARS ? details.slice(0, EVENT_DATA_CHARS) + "…" : details;
    const line = el("div", "event-data", text);
    line.title = details;
    item.append(line);
  }
  return item;
}

// ---- #/events?after=A&limit=L&subject=S: the log in pages, over `after` and `limit` -------------
//
// A page is the events after A, at most L of them (EVENTS_PAGE by default); without A, the newest
// page. Newer: the page after the last event shown (the answer's `last_id`). Older: the span of
// EVENTS_PAGE ids before A, asked for as after=A-EVENTS_PAGE&limit=EVENTS_PAGE, so that nothing is
// skipped or shown twice.

export function mount(container, params, app) {
  const view = fromTemplate("events");
  container.replaceChildren(view.root);
  const subject = params.get("subject") || "";
  view.subject.value = subject;
  const requested = params.has("after") ? Math.max(0, Math.floor(Number(params.get("after"))) || 0) : null;
  const span = params.has("limit") ? Math.min(EVENTS_PAGE, Math.max(1, Math.floor(Number(params.get("limit"))) || 1)) : null;
  let shown = { after: 0, last: 0 };

  function go(after, limit) {
    const query = new URLSearchParams();
    if (after !== null) query.set("after", String(after));
    if (limit) query.set("limit", String(limit));
    if (view.subject.value.trim()) query.set("subject", view.subject.value.trim());
    app.navigate(`#/events${query.toString() ? "?" + query : ""}`);
  }

  async function load() {
    const filter = subject ? { subject } : {};
    let after = requested;
    if (after === null) {
      const head = await get("/v1/events", { after: 0, limit: 1 }, app.signal);
      after = Math.max(0, head.head_id - EVENTS_PAGE);
    }
    let page = await get("/v1/events", { ...filter, after, limit: span || EVENTS_PAGE }, app.signal);
    // With a filter the newest span may hold nothing: step back until something shows.
    for (let step = 0; page.items.length === 0 && after > 0 && requested === null && step < MAX_STEPS_BACK; step++) {
      after = Math.max(0, after - EVENTS_PAGE);
      page = await get("/v1/events", { ...filter, after, limit: EVENTS_PAGE }, app.signal);
    }
    // A span of ids (after, after + limit]: with a filter the answer may reach past it.
    const items = span ? page.items.filter((e) => e.id <= after + span) : page.items;
    const last = items.length ? items[items.length - 1].id : span ? after + span : page.last_id;
    return { after, items, last, head: page.head_id };
  }

  async function render() {
    try {
      const { after, items, last, head } = await load();
      shown = { after, last };
      view.list.replaceChildren(...items.slice().reverse().map((e) => eventItem(e, true)));
      showError(view.error, null);
      note(
        view.range,
        items.length
          ? `Events #${items[0].id}–#${items[items.length - 1].id} of ${head}, newest first.`
          : `No events${subject ? " for " + subject : ""} after #${after}${span ? " up to #" + (after + span) : ""}.`,
      );
      view.older.disabled = after === 0;
      view.newer.disabled = last >= head;
      app.stamp();
    } catch (error) {
      if (!app.refused(error)) showError(view.error, error);
    }
  }

  view.older.addEventListener("click", () => {
    const start = Math.max(0, shown.after - EVENTS_PAGE);
    go(start, shown.after - start);
  });
  view.newer.addEventListener("click", () => go(shown.last, null));
  view.newest.addEventListener("click", () => go(null, null));
  view.form.addEventListener("submit", (event) => {
    event.preventDefault();
    go(null, null);
  });
  render();
}
