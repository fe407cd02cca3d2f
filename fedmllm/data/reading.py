"""Reading on-disk datasets row by row: bad rows and images are reported with file and line."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file, the line and the fix."""


class RowLog:
    """Collects the rows of one file that cannot be used.

    Default: each bad row is dropped and `summary()` gives one line per file. `strict`: the
    first bad row raises DataError naming the file, line and fix.
    """

    def __init__(self, path: Path, strict: bool = False):
        self.path = path
        self.strict = strict
        self.rows = 0
        self.bad: dict[str, list[int]] = defaultdict(list)
        self.kept: dict[str, list[int]] = defaultdict(list)  # rows kept with a change worth a word

    def keep(self, line: int, kind: str) -> None:
        """Record that row `line` is used, changed (`kind`: 'empty text, kept as image-only', ...)."""
        self.kept[kind].append(line)

    def drop(self, line: int, kind: str, detail: str) -> None:
        """Record that row `line` is unusable (`kind`: 'bad JSON', 'missing image', ...)."""
        if self.strict:
            raise DataError(
                f"{self.path}:{line}: {kind}: {detail}. Fix or remove the row, or drop "
                "dataset.strict=true to skip bad rows with a summary"
            )
        self.bad[kind].append(line)

    @property
    def dropped(self) -> int:
        return sum(len(v) for v in self.bad.values())

    def summary(self) -> str | None:
        """'dropped 4 of 20 rows in FILE: 3 bad JSON (lines 4, 9, 12), 1 missing image (line 7)'."""

        def listed(groups: dict[str, list[int]]) -> str:
            parts = []
            for kind, lines in groups.items():
                shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
                parts.append(f"{len(lines)} {kind} ({'line' if len(lines) == 1 else 'lines'} {shown})")
            return ", ".join(parts)

        out = []
        if self.bad:
            out.append(f"dropped {self.dropped} of {self.rows} rows in {self.path}: {listed(self.bad)}")
        if self.kept:
            out.append(f"kept {sum(map(len, self.kept.values()))} rows of {self.path} changed: {listed(self.kept)}")
        return "; ".join(out) or None

    def report(self) -> None:
        """Print the summary (if any row was dropped) to stderr."""
        msg = self.summary()
        if msg:
            print(f"warning: {msg}", file=sys.stderr, flush=True)


def image_problem(path: Path, decode: bool = False) -> tuple[str, str] | None:
    """(kind, detail) when `path` is not a readable image, else None.

    Cheap by default: existence plus PIL's header parse (`Image.open` reads a few hundred bytes,
    ~0.1 ms a file, so 10,000 rows check in about a second). A file truncated after a valid
    header passes that and fails when collation decodes it, with a DataError naming it
    (fedmllm.data.collate.load_image). `decode` (dataset.strict=true) decodes every image fully,
    so such a file is caught when the data loads, at a few ms per image.
    """
    if not path.is_file():
        return "missing image", f"{path} does not exist"
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - parsed from the header
            if decode:
                im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return "corrupt image", f"PIL cannot read {path} ({err})"
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise struct.error, IndexError, ... on cut files
        return "corrupt image", f"PIL cannot decode {path} ({type(err).__name__}: {err})"
    return None


def read_jsonl(path: Path, log: RowLog) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line; bad JSON is logged and skipped."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            log.rows += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                log.drop(line_no, "bad JSON", str(err))
                continue
            if not isinstance(row, dict):
                log.drop(line_no, "bad JSON", f"expected an object, got {type(row).__name__}")
                continue
            yield line_no, row


def read_tsv(path: Path, log: RowLog, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data line of a tab-separated file with a header line.

    No quoting (CrisisMMD tweets contain bare quotes), so one line is one row; a row whose
    field count differs from the header's is logged as a bad TSV row.
    """
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(
                f"{path}:1: header lacks column(s) {missing}; expected tab-separated columns "
                f"including {list(required)} (found {header})"
            )
        for line_no, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            log.rows += 1
            fields = line.split("\t")
            if len(fields) != len(header):
                log.drop(line_no, "bad TSV row", f"{len(fields)} tab-separated fields, the header has {len(header)}")
                continue
            yield line_no, dict(zip(header, fields))


def iter_json_array(path: Path, log: RowLog) -> Iterator[tuple[int, Any]]:
    """(line where the element starts, element) for a file holding one JSON array.

    Elements are decoded one at a time so each can be reported with its line; a syntax error
    ends the file (nothing after it can be located), reported with its line.
    """
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        log.rows += 1
        log.drop(text.count("\n", 0, pos) + 1, "bad JSON", "the file must hold one JSON array [ {...}, ... ]")
        return
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while pos < len(text):
        line = text.count("\n", 0, pos) + 1
        log.rows += 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            log.drop(
                line, "bad JSON", f"{err.msg} at line {err.lineno} column {err.colno}; the rest of the file is unread"
            )
            return
        yield line, obj
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            log.rows += 1
            log.drop(
                text.count("\n", 0, pos) + 1,
                "bad JSON",
                "expected ',' or ']' after an element; the rest of the file is unread",
            )
            return


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def require_files(what: str, root: Path, needed: list[str], hint: str, layout: list[str] | None = None) -> None:
    """Raise one DataError line naming `root`, the missing `needed` files and the expected `layout`."""
    layout = layout or needed
    if not root.is_dir():
        raise DataError(f"{what}: directory {root} does not exist; expected there: {', '.join(layout)}. {hint}")
    missing = [e for e in needed if not (root / e.rstrip("/")).exists()]
    if missing:
        raise DataError(f"{what}: {root} lacks {', '.join(missing)}; expected there: {', '.join(layout)}. {hint}")
