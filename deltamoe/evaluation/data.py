"""Reading task data from local JSONL or TSV files, with errors that name the file, the line and the column.

Every task reads its examples through `read_records`, so the rules are the same everywhere:

* `*.jsonl`: one JSON object per line; blank lines are skipped.
* `*.tsv`: a header row of column names, then one example per row, tab-separated, no quoting (a tab or newline
  inside a field cannot be written; use JSONL for such text). Columns named `choice_0`, `choice_1`, ... are gathered,
  in index order, into one list column `choices` so multiple-choice data can be written as TSV too.

An empty file (no examples), a missing column or a value of the wrong type is a `DeltaMoEError`.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError

_CHOICE_COLUMN = re.compile(r"^choice_(\d+)$")


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DeltaMoEError(f"{path}:{line_no}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DeltaMoEError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            obj["_line"] = line_no
            records.append(obj)
    return records


def _read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [(i, r) for i, r in enumerate(rows, start=1) if any(cell.strip() for cell in r)]
    if not rows:
        return []
    _, header = rows[0]
    choice_cols = sorted(
        ((int(m.group(1)), j) for j, name in enumerate(header) if (m := _CHOICE_COLUMN.match(name))), key=lambda t: t[0]
    )
    records = []
    for line_no, row in rows[1:]:
        if len(row) != len(header):
            raise DeltaMoEError(f"{path}:{line_no}: {len(row)} tab-separated fields, the header has {len(header)}")
        rec = {name: cell for name, cell in zip(header, row) if not _CHOICE_COLUMN.match(name)}
        if choice_cols:
            # Empty trailing choice cells let rows with fewer choices share one header.
            rec["choices"] = [row[j] for _, j in choice_cols if row[j] != ""]
        rec["_line"] = line_no
        records.append(rec)
    return records


def read_records(path: str | Path, required: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Read all examples of a JSONL/TSV file and check that each has the `required` columns with the given types.

    TSV cells are strings; a required `int` column in a TSV file is converted (an error if it is not an integer).
    Each record keeps its source line number in `_line` for later error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise DeltaMoEError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".tsv":
        records = _read_tsv(path)
    else:
        raise DeltaMoEError(f"data file {path}: unknown format {suffix!r}; expected .jsonl or .tsv")
    if not records:
        raise DeltaMoEError(f"data file {path} is empty: expected at least one example")
    for rec in records:
        where = f"{path}:{rec['_line']}"
        for column, types in required.items():
            if column not in rec:
                present = sorted(k for k in rec if k != "_line")
                raise DeltaMoEError(f"{where}: missing column {column!r} (columns present: {present})")
            value = rec[column]
            if suffix == ".tsv" and types is int and isinstance(value, str):
                try:
                    value = rec[column] = int(value)
                except ValueError:
                    raise DeltaMoEError(f"{where}: column {column!r} must be an integer, got {value!r}") from None
            if not isinstance(value, types) or (types is int and isinstance(value, bool)):
                want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
                raise DeltaMoEError(f"{where}: column {column!r} must be {want}, got {type(value).__name__}")
    return records

