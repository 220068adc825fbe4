"""Prints the run's final table from the evaluate stage's metrics: ``python -m pipeline.report.summary <metrics.json>``.

``make run`` calls it after ``dvc repro``; it reads only the metrics file, so it is instant.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        # First column (names) left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _stage_rank(name: str) -> tuple[int, str]:
    """Pipeline order (source only, warm-up, stage 1, KD rounds, oracle), not the JSON's alphabetical order."""
    head = "source_only" if name == "source_only" else name.split("_")[0]
    order = {"source_only": -1, "warmup": 0, "adapt": 1, "distill": 2, "teacher": 2, "oracle": 3}
    num = name.rsplit("_", 1)[-1]
    return order.get(head, 4), num.zfill(4) if num.isdigit() else name


def format_summary(metrics: dict[str, Any]) -> str:
    """Plain-text tables: mIoU / pixel accuracy / gap closed per stage, then pseudo-label quality."""
    gaps = metrics.get("gap_closed", {})
    rows = []
    for name, m in sorted(metrics.get("stages", {}).items(), key=lambda kv: _stage_rank(kv[0])):
        gap = "" if name not in gaps else _num(gaps[name], "{:.1f}%")  # evaluate.json holds percent
        rows.append([name, _num(m.get("miou")), _num(m.get("pixel_acc")), gap])
    out = ["mIoU on target val (%), every stage's model; gap closed: share of the source-only -> oracle gap"]
    out += _table(["stage", "mIoU", "pixel acc", "gap closed"], rows)
    out.append(f"final model: {metrics.get('final_stage', '?')}")
    quality = metrics.get("pseudo_labels", {})
    if quality:
        out += ["", "pseudo-label quality on target train (%, kept pixels)"]
        q_rows = [
            [
                n,
                q.get("selection") or _num(q.get("threshold"), "{:g}"),
                _num(q.get("coverage")),
                _num(q.get("pixel_acc")),
                _num(q.get("miou")),
            ]
            for n, q in sorted(quality.items(), key=lambda kv: _stage_rank(kv[0]))
        ]
        out += _table(["labels", "threshold", "coverage", "pixel acc", "mIoU"], q_rows)
    else:
        out += ["", "pseudo-label quality: not measured (no target-train ground truth)"]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pipeline.report.summary <metrics JSON of the evaluate stage>", file=sys.stderr)
        return 2
    path = Path(args[0])
    if not path.is_file():
        print(f"{path} not found: run `dvc repro` first (it is written by the evaluate stage)", file=sys.stderr)
        return 1
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        print(f"{path} is not valid JSON ({err}): rerun `dvc repro evaluate`", file=sys.stderr)
        return 1
    print(format_summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
