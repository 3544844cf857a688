// #/vms?project=P&status=S&host=H : every VM, in any status, filtered; pages of PAGE over `next`.
"use strict";

import { get } from "./api.js";
import { VM_COLUMNS } from "./columns.js";
import { dataTable, el, fillTable, fromTemplate, note, showError } from "./dom.js";
import { NOT_ENDED_VM_STATUSES, VM_STATUSES } from "./figures.js";

const PAGE = 100;
const NOT_ENDED = "not-ended";

function statusParam(choice) {
  if (choice === NOT_ENDED) return NOT_ENDED_VM_STATUSES;
  return VM_STATUSES.includes(choice) ? choice : null;
}

export function mount(container, params, app) {
  const view = fromTemplate("vms");
  container.replaceChildren(view.root);
  const table = dataTable(VM_COLUMNS);
  table.table.id = "vms-table";
  view.table.append(table.wrap);

  view.status.append(el("option", null, "any status"), el("option", null, "not ended"));
  view.status.options[0].value = "";
  view.status.options[1].value = NOT_ENDED;
  for (const s of VM_STATUSES) view.status.append(el("option", null, s));
  const filters = { project: params.get("project") || "", status: params.get("status") || "", host: params.get("host") || "" };
  view.project.value = filters.project;
  view.status.value = filters.status;
  view.host.value = filters.host;

  const cursors = [null]; // cursors[i]: where page i starts
  let page = 0;

  function apply() {
    const query = new URLSearchParams();
    for (const key of ["project", "status", "host"]) {
      const value = view[key].value.trim();
      if (value) query.set(key, value);
    }
    app.navigate(`#/vms${query.toString() ? "?" + query : ""}`);
  }

  async function render() {
    try {
      const body = await get(
        "/v1/vms",
        {
          project: filters.project || null,
          host: filters.host || null,
          status: statusParam(filters.status),
          limit: PAGE,
          cursor: cursors[page],
        },
        app.signal,
      );
      cursors[page + 1] = body.next;
      fillTable(table.tbody, VM_COLUMNS, body.items, "no VM matches");
      const first = page * PAGE + 1;
      note(view.range, body.items.length ? `VMs ${first}–${first + body.items.length - 1}${body.next ? ", more on the next page" : ""}` : null);
      view.prev.disabled = page === 0;
      view.next.disabled = !body.next;
      // Projects seen, offered as suggestions in the filter.
      const known = new Set([...view.projects.options].map((o) => o.value));
      for (const vm of body.items) {
        if (!known.has(vm.project)) {
          known.add(vm.project);
          const option = el("option");
          option.value = vm.project;
          view.projects.append(option);
        }
      }
      showError(view.error, null);
      app.stamp();
    } catch (error) {
      if (app.signal.aborted || app.refused(error)) return;
      showError(view.error, error);
    }
  }

  view.form.addEventListener("submit", (event) => {
    event.preventDefault();
    apply();
  });
  view.status.addEventListener("change", apply);
  view.next.addEventListener("click", () => {
    page += 1;
    render();
  });
  view.prev.addEventListener("click", () => {
    page = Math.max(0, page - 1);
    render();
  });
  render();
}
