// DOM helpers. Every text from the server goes into the DOM through textContent, never as markup.
"use strict";

export const STATES = ["ready", "disabled", "failed", "unsupported", "unknown"];

export const $ = (id) => document.getElementById(id);

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

export function link(href, text, className) {
  const a = el("a", className, text);
  a.href = href;
  return a;
}

// A copy of <template id="tpl-NAME"> and its elements that carry data-ref="...", by ref.
export function fromTemplate(name) {
  const root = $(`tpl-${name}`).content.firstElementChild.cloneNode(true);
  const refs = { root };
  for (const node of root.querySelectorAll("[data-ref]")) refs[node.dataset.ref] = node;
  return refs;
}

function fill(td, content) {
  if (content instanceof Node) td.append(content);
  else td.textContent = content === undefined || content === null || content === "" ? "—" : String(content);
}

// A table described by its columns: [{title, className, render(item) -> Node | text, hint(item)}].
// Adding a column is adding one entry to a view's list.
export function dataTable(columns) {
  const table = el("table", "grid");
  const head = el("tr");
  for (const column of columns) head.append(el("th", column.className || null, column.title));
  const thead = el("thead");
  thead.append(head);
  const tbody = el("tbody");
  table.append(thead, tbody);
  const wrap = el("div", "table-wrap");
  wrap.append(table);
  return { wrap, table, tbody };
}

export function fillTable(tbody, columns, items, emptyText) {
  const rows = items.map((item) => {
    const row = el("tr");
    for (const column of columns) {
      const td = el("td", column.className || null);
      fill(td, column.render(item));
      const hint = column.hint ? column.hint(item) : null;
      if (hint) td.title = hint;
      row.append(td);
    }
    return row;
  });
  if (rows.length === 0) {
    const row = el("tr");
    const td = el("td", "empty-row", emptyText);
    td.colSpan = columns.length;
    row.append(td);
    rows.push(row);
  }
  tbody.replaceChildren(...rows);
}

// Key/value rows: [[label, Node | text], ...]; rows whose value is undefined are left out.
export function details(dl, rows) {
  const nodes = [];
  for (const [label, value] of rows) {
    if (value === undefined) continue;
    const dd = el("dd");
    fill(dd, value);
    nodes.push(el("dt", null, label), dd);
  }
  dl.replaceChildren(...nodes);
}

export function stateClass(state) {
  return STATES.includes(state) ? `tdx-${state}` : "tdx-other";
}

export function tdxBadge(state) {
  return el("span", `badge ${stateClass(state)}`, state);
}

const VM_CLASSES = {
  running: "ok", scheduled: "info", pending: "warn", deleting: "warn", deleted: "off", failed: "bad", lost: "bad",
};

export function vmStatus(status) {
  return el("span", `pill ${VM_CLASSES[status] || "off"}`, status);
}

const SCHEDULING_CLASSES = { schedulable: "ok", cordoned: "warn", draining: "warn", stale: "bad" };

export function schedulingPill(word) {
  return el("span", `pill ${SCHEDULING_CLASSES[word] || "off"}`, word);
}

export function alivePill(host) {
  if (host.alive) return el("span", "pill ok", "alive");
  return host.last_heartbeat_at ? el("span", "pill bad", "stale") : el("span", "pill off", "never seen");
}

export function showError(node, error) {
  if (!error) {
    node.hidden = true;
    node.textContent = "";
    return;
  }
  node.hidden = false;
  node.textContent =
    error.status === 403 ? `This token's role may not read this (${error.message}).` : String(error.message);
}

export function note(node, text) {
  node.hidden = !text;
  node.textContent = text || "";
}

// 0.5, 2, 127.5: one decimal only where it says something.
export function gib(mib) {
  return String(Number((mib / 1024).toFixed(1)));
}

export function age(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.floor(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}

export function clock(iso) {
  const when = iso ? new Date(iso) : new Date();
  return when.toLocaleTimeString([], { hour12: false });
}

export function when(iso) {
  return iso ? `${iso.slice(0, 19).replace("T", " ")} (${age(iso)} ago)` : null;
}

export function usageBar(used, total, unit) {
  const wrap = el("div", "usage");
  wrap.append(el("span", "usage-text", `${used}/${total}${unit ? " " + unit : ""}`));
  const bar = el("div", "bar");
  const fill = el("div", "bar-fill");
  const ratio = Number(total) > 0 ? Math.min(1, Number(used) / Number(total)) : 0;
  fill.style.width = `${(ratio * 100).toFixed(1)}%`;
  if (ratio >= 0.9) fill.classList.add("bar-high");
  bar.append(fill);
  wrap.append(bar);
  return wrap;
}

export function chips(pairs, className) {
  const box = el("div", "labels");
  for (const text of pairs) box.append(el("span", className || "chip", text));
  return box.childElementCount ? box : null;
}

export function labelsOf(labels) {
  return Object.entries(labels || {})
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([k, v]) => `${k}=${v}`);
}

export function byName(a, b) {
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}
