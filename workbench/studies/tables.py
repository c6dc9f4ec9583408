"""Study summaries as markdown tables (gallery index, README)."""

from __future__ import annotations


def markdown_table(rows: list[dict]) -> str:
    """Summary rows (dicts with a "model" key) as a markdown table, one column per model."""
    keys = [k for k in rows[0] if k != "model"]
    lines = ["| | " + " | ".join(r["model"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    lines += [f"| {k} | " + " | ".join(str(r.get(k, "")) for r in rows) + " |" for k in keys]
    return "\n".join(lines)
