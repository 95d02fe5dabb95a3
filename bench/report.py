"""Shared output for bench scripts: a readable table, or JSON lines with --json.

Each figure is one JSON object per line: {"figure": NAME, "value": NUMBER, "unit": TEXT}.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field


@dataclass
class Report:
    title: str
    rows: list[tuple[str, float, str, str]] = field(default_factory=list)

    def add(self, figure: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append((figure, float(value), unit, note))

    def emit(self, as_json: bool) -> None:
        if as_json:
            for figure, value, unit, _ in self.rows:
                print(json.dumps({"figure": figure, "value": round(value, 6), "unit": unit}))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=self.title)
        table.add_column("figure")
        table.add_column("value", justify="right")
        table.add_column("unit")
        table.add_column("note")
        for figure, value, unit, note in self.rows:
            table.add_row(figure, f"{value:,.3f}", unit, note)
        Console().print(table)
        sys.stdout.flush()


def bench_argparser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    return parser
