"""Markdown table of ``dmrstream evaluate --out`` JSON files: ``python -m trainer.report DIR``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [("dmr", ()), ("dmr", ("u2i",)), ("dmr", ("i2i",)), ("dmr", ("aux_loss",)), ("dmr", ("position",)),
        ("dmr", ("shared_item_table",)), ("din", ()), ("lr", ()), ("counters", ())]
LABEL = {"u2i": "no U2I", "i2i": "no I2I", "aux_loss": "no auxiliary loss", "position": "no position",
         "shared_item_table": "one shared item table"}


def table(results_dir: str | Path) -> str:
    found: dict[tuple, dict] = {}
    for f in Path(results_dir).glob("*.json"):
        r = json.loads(f.read_text())
        found[(r["model"], tuple(r["ablate"]), r["mode"])] = r

    def cell(key):
        r = found.get(key)
        if r is None:
            return "not run"
        return f"{r['test_auc_mean']:.4f} +- {r['test_auc_std']:.4f} ({len(r['seeds'])})"

    lines = ["| model | offline test AUC (seeds) | streaming test AUC (seeds) |", "|---|---|---|"]
    for model, abl in ROWS:
        name = model.upper() if model != "counters" else "streaming counters (logistic)"
        if abl:
            name += " - " + ", ".join(LABEL[a] for a in abl)
        lines.append(f"| {name} | {cell((model, abl, 'offline'))} | {cell((model, abl, 'prequential'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "."))
