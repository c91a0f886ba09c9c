"""A benchmark's latest results as rows of a named table in scripts/README.md, one set per machine.

Each table sits between two marker comments, and the scripts own what is between them:

    <!-- results: benchmark_e2e -->
    | machine | date | commit | run | ... |
    |---|---|---|---|---|
    | AMD EPYC (family 25 model 1), 2 cores | 2026-12-03 | f86a463 | ... | ... |
    <!-- /results: benchmark_e2e -->

`write_rows` removes the table's rows whose key cells (the machine and what was run) equal a
new row's and puts the new rows in their place, so measuring again on one machine replaces
that machine's rows and leaves every other machine's. A machine is its CPU as /proc/cpuinfo
names it plus the CPU family, model and core count: under a hypervisor the name alone is
often generic ("AMD EPYC" for Zen 3 and Zen 5 alike), and only the number in parentheses
decides whether two rows are the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().with_name("README.md")
REPO = README.parents[1]
# "<name> (family F model M), N cores": the part that identifies a CPU machine.
_CPU_IDENTITY = re.compile(r"\((family \d+ model \d+)\), (\d+) cores$")


def add_option(parser: argparse.ArgumentParser) -> None:
    """`--markdown [FILE]`: also write the results into their table in FILE (default scripts/README.md)."""
    parser.add_argument("--markdown", type=Path, nargs="?", const=README, default=None, metavar="FILE",
                        help="replace this machine's rows in the script's table of FILE "
                             "(default: scripts/README.md)")


def cpu() -> str:
    """This CPU: '<model name> (family F model M), N cores' (Linux), else what `platform` says."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cores = os.cpu_count() or 1
    if "model name" in fields and "cpu family" in fields:
        # Without trademark signs and a bare trailing "Processor": "Intel(R) Xeon(R) Processor" -> "Intel Xeon".
        name = re.sub(r"\s+Processor$", "", re.sub(r"\((R|TM)\)", "", fields["model name"])).strip()
        return f"{name} (family {fields['cpu family']} model {fields.get('model', '?')}), {cores} cores"
    return f"{platform.processor() or platform.machine()}, {cores} cores"


def commit() -> str:
    """HEAD's short hash, with '+' when tracked code (not the Markdown) differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    changed = git("diff", "--quiet", "HEAD", "--", ".", ":(exclude)*.md").returncode != 0
    return head.stdout.strip() + ("+" if changed else "")


def stamp(machine: str | None = None) -> dict[str, str]:
    """The first three cells of every row: machine (default: this CPU), today's UTC date, commit."""
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return {"machine": machine or cpu(), "date": today, "commit": commit()}


def machine_key(cell: str) -> str:
    """What identifies a machine in a row's first cell (see the module docstring)."""
    found = _CPU_IDENTITY.search(cell)
    return f"{found.group(1)}, {found.group(2)} cores" if found else cell


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _line(cells) -> str:
    return "| " + " | ".join(str(cell).replace("|", "/").replace("\n", " ") for cell in cells) + " |"


def replace_rows(text: str, table: str, rows: list[dict[str, str]], key: tuple[str, ...]) -> str:
    """`text` with table `table`'s rows that share a new row's `key` cells replaced by `rows`.

    Raises ValueError when the table's markers are missing or its header has other columns
    than the rows (the table was written by another version of the script: fix it by hand).
    """
    columns = list(rows[0])
    if any(list(row) != columns for row in rows) or not set(key) <= set(columns):
        raise ValueError(f"table {table}: every row needs the columns {columns}, the key {key} among them")
    begin, end = f"<!-- results: {table} -->", f"<!-- /results: {table} -->"
    lines = text.split("\n")
    try:
        first, last = lines.index(begin), lines.index(end)
    except ValueError:
        raise ValueError(f"no table {table!r} in the file: it needs the lines {begin!r} and {end!r}") from None
    body = [line for line in lines[first + 1:last] if line.strip()]
    if body and _cells(body[0]) != columns:
        raise ValueError(f"table {table}: its header is {_cells(body[0])}, this script writes {columns}")

    def identity(cells: dict[str, str]) -> tuple:
        return tuple(machine_key(cells[k]) if k == "machine" else cells[k].strip() for k in key)

    new_keys = {identity(row) for row in rows}
    kept, position = [], None
    for line in body[2:]:
        cells = dict(zip(columns, _cells(line)))
        if len(cells) == len(columns) and identity(cells) in new_keys:
            position = len(kept) if position is None else position
        else:
            kept.append(line)
    position = len(kept) if position is None else position
    new_lines = [_line(row.values()) for row in rows]
    body = [_line(columns), _line(["---"] * len(columns)), *kept[:position], *new_lines, *kept[position:]]
    return "\n".join([*lines[:first + 1], *body, *lines[last:]])


def write_rows(path: Path, table: str, rows: list[dict[str, str]], key: tuple[str, ...] = ("machine", "run")) -> None:
    """Replace this machine's rows of `table` in the Markdown file `path` (see `replace_rows`)."""
    text = replace_rows(path.read_text(), table, rows, key)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    print(f"wrote {len(rows)} row(s) of {rows[0]['machine']} into table {table!r} of {path}")
