// #/projects : every project with its quota, used/limit per resource (GET /v1/projects).
"use strict";

import { getAll } from "./api.js";
import { PROJECT_COLUMNS } from "./columns.js";
import { dataTable, fillTable, fromTemplate, note, showError } from "./dom.js";

const MAX_PAGES = 20; // at most 10,000 projects

export async function mount(container, _params, app) {
  const view = fromTemplate("projects");
  container.replaceChildren(view.root);
  const table = dataTable(PROJECT_COLUMNS);
  table.table.id = "projects-table";
  view.table.append(table.wrap);
  try {
    const { items, truncated } = await getAll("/v1/projects", null, MAX_PAGES, app.signal);
    fillTable(table.tbody, PROJECT_COLUMNS, items, "no project has a quota or a VM yet");
    view.count.textContent = `(${items.length}${truncated ? "+" : ""})`;
    note(view.note, truncated ? `Showing the first ${items.length} projects.` : null);
    showError(view.error, null);
    app.stamp();
  } catch (error) {
    if (app.signal.aborted || app.refused(error)) return;
    showError(view.error, error);
  }
}
