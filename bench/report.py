"""The results table (printed, and pasted into bench/README.md) and the JSON written to bench/results/."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.load import fmt
from bench.scenarios import Row

HEADER = (
    "scenario", "db", "hosts", "conns", "op", "ops/s", "p50 ms", "p99 ms",
    "server CPU ms/req", "retries/success", "over-commits", "x HTTP ceiling", "x DB ceiling", "note",
)


def _ratio(a: float, b: float | None) -> float:
    return a / b if b else float("nan")


def row_dict(row: Row, http_ceiling: dict[int, float], db_ceiling: dict[str, float]) -> dict[str, Any]:
    s = row.rec.summary(row.op)
    return {
        "scenario": row.scenario,
        "db": row.db,
        "hosts": row.hosts,
        "conns": row.conns,
        "replicas": row.replicas,
        "op": row.op,
        "per_s": s["per_s"],
        "count": s["count"],
        "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"],
        "max_ms": s["max_ms"],
        "server_cpu_ms_per_request": row.cpu_ms_per_request,
        "retries_per_success": row.retries_per_success,
        "claim_conflicts": row.conflicts,
        "overcommits": row.overcommits,
        "misplaced_tdx": row.misplaced,
        "x_http_ceiling": _ratio(s["per_s"], http_ceiling.get(row.conns)),
        "x_db_ceiling": _ratio(s["per_s"], db_ceiling.get(row.db)),
        "errors": row.rec.errors,
        "first_error": row.rec.first_error,
        "all_outcomes": row.rec.all_summaries(),
        "note": row.note,
        **({"extra": row.extra} if row.extra else {}),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for r in rows:
        oc = r["overcommits"]
        cells = [
            r["scenario"] + (f" ({r['replicas']} replicas)" if r["replicas"] > 1 else ""),
            r["db"],
            f"{r['hosts']:,}",
            str(r["conns"]),
            r["op"],
            fmt(r["per_s"], 0),
            fmt(r["p50_ms"], 1),
            fmt(r["p99_ms"], 1),
            fmt(r["server_cpu_ms_per_request"], 2),
            fmt(r["retries_per_success"], 3),
            "-" if oc is None else str(oc),
            fmt(r["x_http_ceiling"], 2),
            fmt(r["x_db_ceiling"], 2),
            (r["note"] + (f"; errors {r['errors']}" if r["errors"] else "")).strip("; "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
