"""Figures collected by the chaos and security tests, printed as one table at the end."""

from __future__ import annotations

from pathlib import Path

from .harness import Figures

ROWS: list[tuple[str, Figures, str]] = []
REPORT = Path("reports/chaos.md")


def record(scenario: str, figures: Figures, note: str = "") -> None:
    ROWS.append((scenario, figures, note))


def table() -> str:
    lines = [
        "| scenario | produced | delivered | duplicates | reordered | resynced | lost | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, f, note in ROWS:
        lines.append(
            f"| {name} | {f.produced} | {f.delivered} | {f.duplicates} | {f.reordered} "
            f"| {f.resynced} | {f.lost} | {note} |"
        )
    return "\n".join(lines)


def write() -> str:
    text = table()
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(text + "\n")
    return text
