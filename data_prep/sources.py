"""Input documents: expanding paths/globs, the embedded Python-stdlib corpus, work units, reading.

A `.jsonl` file holds one document per line (a JSON object with a text field), a `.parquet` file one
document per row (a string column, `text_field`, as most public corpora ship); every other file is one
document. Work units (`Task`) are fixed by the inputs and `task_bytes` only, never by the number
of workers or MPI ranks, so the output of `tokenize_shards` does not depend on how many ran.

Bad input (`SKIP_REASONS`) is skipped and counted in a `Skipped` record with its first locations, or,
with `strict`, is an error naming the first location. A record is a text file, a non-blank jsonl line,
a Parquet row or an unreadable file: records read = documents kept + skipped by reason.
"""
from __future__ import annotations

import glob
import json
import mmap
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from pipeline.data.manifest import DataError

JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
# File types picked up when an input is a directory (explicit files and globs take any file).
DIR_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".parquet")
STDLIB_EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__",
    "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
})


SKIP_REASONS = {
    "invalid_utf8": "not valid UTF-8",
    "empty_document": "empty document",
    "malformed_json": "malformed JSON line",
    "missing_text_field": "no text in the text field",
    "unreadable_file": "unreadable file",
}
MAX_SKIP_LOCATIONS = 5


@dataclass
class Skipped:
    """Records skipped by reason, with the first `MAX_SKIP_LOCATIONS` locations of each (in input order
    when merged in task order); blank jsonl lines are counted apart (they are no record)."""

    counts: Dict[str, int] = field(default_factory=dict)
    locations: Dict[str, List[str]] = field(default_factory=dict)
    blank_lines: int = 0

    def add(self, reason: str, where: str, detail: str, strict: bool) -> None:
        if strict:
            raise DataError(f"{where}: {detail} (--strict: bad input is an error; without it, it is skipped "
                            "and counted)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        found = self.locations.setdefault(reason, [])
        if len(found) < MAX_SKIP_LOCATIONS:
            found.append(f"{where}: {detail}")

    def merge(self, other: "Skipped") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            found = self.locations.setdefault(reason, [])
            found += other.locations.get(reason, [])[:MAX_SKIP_LOCATIONS - len(found)]
        self.blank_lines += other.blank_lines

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> Dict:
        return {"counts": dict(sorted(self.counts.items())), "locations": dict(sorted(self.locations.items())),
                "blank_lines": self.blank_lines}

    @classmethod
    def from_dict(cls, d: Dict) -> "Skipped":
        return cls(counts=dict(d["counts"]), locations={k: list(v) for k, v in d["locations"].items()},
                   blank_lines=int(d["blank_lines"]))


@dataclass(frozen=True)
class InputFile:
    path: str
    """Where to read it."""
    name: str
    """Identity used in `doc_id` (`name` for a text file, `name:line` for a jsonl line, `name:row` for a
    Parquet row, counted from 0)."""
    kind: str
    """`text` (the file is one document), `jsonl` (one document per line) or `parquet` (one per row)."""
    size: int


@dataclass(frozen=True)
class Task:
    """A unit of work: several whole text files, a line-aligned byte range of one jsonl file, or a range of
    row groups of one Parquet file (`start`, `end`: row groups; `first_line`: the first row's index)."""

    index: int
    kind: str
    files: Tuple[Tuple[str, str], ...] = ()
    """(path, name) of the text files (kind `text`)."""
    path: str = ""
    name: str = ""
    start: int = 0
    end: int = 0
    first_line: int = 1
    """Line number of the byte at `start` (kind `jsonl`)."""
    nbytes: int = 0
    error: str = ""
    """Why the file could not be read while planning (kind `unreadable`): one skipped record."""


def _kind(path: str) -> str:
    lower = path.lower()
    return "jsonl" if lower.endswith(JSONL_SUFFIXES) else "parquet" if lower.endswith(PARQUET_SUFFIXES) else "text"


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None


def _unreadable(f: InputFile, index: int, error: str) -> Task:
    return Task(index=index, kind="unreadable", path=f.path, name=f.name, nbytes=f.size, error=error)


def _parquet_tasks(f: InputFile, task_bytes: int, first_index: int) -> List[Task]:
    """Consecutive row groups of about `task_bytes` (uncompressed) per task."""
    try:
        meta = _parquet_file(f.path).metadata
    except DataError as err:
        return [_unreadable(f, first_index, str(err).split(": ", 1)[-1])]
    tasks: List[Task] = []
    start = row = rows = nbytes = 0
    for group in range(meta.num_row_groups):
        info = meta.row_group(group)
        rows += info.num_rows
        nbytes += info.total_byte_size
        if nbytes >= task_bytes or group == meta.num_row_groups - 1:
            tasks.append(Task(index=first_index + len(tasks), kind="parquet", path=f.path, name=f.name, start=start,
                              end=group + 1, first_line=row, nbytes=nbytes))
            start, row, rows, nbytes = group + 1, row + rows, 0, 0
    return tasks


def expand_inputs(inputs: Union[Sequence[str], str]) -> List[InputFile]:
    """Files, directories (recursive, files with DIR_SUFFIXES) and globs, in the given order; each
    glob/directory sorted. A missing path or a glob matching nothing is an error."""
    out: List[InputFile] = []
    seen = set()
    inputs = as_list(inputs)

    def add(path: str, name: str) -> None:
        real = os.path.realpath(path)
        if real in seen:
            return
        seen.add(real)
        out.append(InputFile(path=path, name=name, kind=_kind(path), size=os.path.getsize(path)))

    for spec in inputs:
        if any(ch in spec for ch in "*?["):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{spec}: input pattern matches no file")
            for p in matches:
                add(p, os.path.normpath(p))
        elif os.path.isdir(spec):
            found = []
            for dirpath, dirnames, filenames in os.walk(spec):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found += [os.path.join(dirpath, f) for f in filenames
                          if f.lower().endswith(DIR_SUFFIXES) and not f.startswith(".")]
            if not found:
                raise DataError(f"{spec}: input directory holds no {'/'.join(DIR_SUFFIXES)} file")
            for p in sorted(found):
                add(p, os.path.normpath(p))
        elif os.path.isfile(spec):
            add(spec, os.path.normpath(spec))
        else:
            raise DataError(f"{spec}: input file not found")
    return out


def python_stdlib_files(max_bytes: int = 8_000_000) -> Tuple[List[InputFile], Dict]:
    """The running Python's own standard-library `.py` sources (no tests, IDLE, site-packages...),
    in sorted relative-path order, each taken if it still fits in `max_bytes` (0: no cap)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"{root}: Python standard library folder not found")
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and not d.startswith(("config-", "."))]
        rel_dir = Path(dirpath).relative_to(root)
        rels += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    files: List[InputFile] = []
    total = 0
    for rel in sorted(rels):
        path = root / rel
        size = path.stat().st_size
        if max_bytes and total + size > max_bytes:
            continue  # too big for what is left of the budget; smaller later files may still fit
        files.append(InputFile(path=str(path), name=f"python-stdlib/{rel}", kind="text", size=size))
        total += size
    if not files:
        raise DataError(f"{root}: no standard-library .py file fits max_bytes={max_bytes}")
    info = {"name": "python-stdlib", "root": str(root), "python": sys.version.split()[0],
            "files": len(files), "files_available": len(rels), "bytes": total, "max_bytes": max_bytes}
    return files, info


def plan_tasks(files: Sequence[InputFile], task_bytes: int = 1 << 20) -> List[Task]:
    """Group consecutive text files into tasks of about `task_bytes`; cut jsonl files into
    line-aligned byte ranges and Parquet files into row-group ranges of about `task_bytes`. Order is preserved."""
    task_bytes = max(1, int(task_bytes))
    tasks: List[Task] = []
    group: List[Tuple[str, str]] = []
    group_bytes = 0

    def close_group() -> None:
        nonlocal group, group_bytes
        if group:
            tasks.append(Task(index=len(tasks), kind="text", files=tuple(group), nbytes=group_bytes))
        group, group_bytes = [], 0

    for f in files:
        if f.kind == "text":
            group.append((f.path, f.name))
            group_bytes += f.size
            if group_bytes >= task_bytes:
                close_group()
            continue
        close_group()
        if f.kind == "parquet":
            tasks += _parquet_tasks(f, task_bytes, len(tasks))
            continue
        size = os.path.getsize(f.path)
        if size == 0:
            continue
        try:
            handle = open(f.path, "rb")
        except OSError as err:
            tasks.append(_unreadable(f, len(tasks), f"cannot read ({err.strerror})"))
            continue
        with handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            start, line = 0, 1
            while start < size:
                end = min(start + task_bytes, size)
                if end < size:
                    nl = mm.find(b"\n", end - 1)
                    end = size if nl < 0 else nl + 1
                tasks.append(Task(index=len(tasks), kind="jsonl", path=f.path, name=f.name,
                                  start=start, end=end, first_line=line, nbytes=end - start))
                line += mm[start:end].count(b"\n")
                start = end
    close_group()
    return tasks


def _utf8_error(data: bytes, err: UnicodeDecodeError, line_base: int = 1) -> Tuple[int, str]:
    line = line_base + data.count(b"\n", 0, err.start)
    return line, f"not valid UTF-8 ({err.reason} at byte {err.start})"


def read_task(task: Task, text_field: str = "text", strict: bool = False) -> Tuple[List[Tuple[str, str]], Skipped]:
    """The task's non-empty, valid documents as (doc_id, text), and what was skipped (see module doc)."""
    docs: List[Tuple[str, str]] = []
    skipped = Skipped()
    if task.kind == "unreadable":
        skipped.add("unreadable_file", task.path, task.error, strict)
        return docs, skipped
    if task.kind == "text":
        for path, name in task.files:
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as err:
                skipped.add("unreadable_file", path, f"cannot read ({err.strerror})", strict)
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                line, detail = _utf8_error(data, err)
                skipped.add("invalid_utf8", f"{path}:{line}", detail, strict)
                continue
            if text:
                docs.append((name, text))
            else:
                skipped.add("empty_document", path, "empty document", strict)
        return docs, skipped
    if task.kind == "parquet":
        return _read_parquet(task, text_field, strict)
    try:
        with open(task.path, "rb") as handle:
            handle.seek(task.start)
            data = handle.read(task.end - task.start)
    except OSError as err:
        skipped.add("unreadable_file", task.path, f"cannot read ({err.strerror})", strict)
        return docs, skipped
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for offset, raw in enumerate(lines):
        lineno = task.first_line + offset
        where = f"{task.path}:{lineno}"
        if not raw.strip():
            skipped.blank_lines += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            skipped.add("invalid_utf8", where, _utf8_error(raw, err)[1], strict)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            skipped.add("malformed_json", where, f"invalid JSON at column {err.colno} ({err.msg})", strict)
            continue
        if not isinstance(obj, dict) or text_field not in obj:
            skipped.add("missing_text_field", where, f"JSON line has no '{text_field}' field", strict)
            continue
        value = obj[text_field]
        if not isinstance(value, str):
            skipped.add("missing_text_field", where,
                        f"field '{text_field}' must be a string, got {type(value).__name__}", strict)
        elif not value:
            skipped.add("empty_document", where, "empty document", strict)
        else:
            docs.append((f"{task.name}:{lineno}", value))
    return docs, skipped


def _read_parquet(task: Task, text_field: str, strict: bool) -> Tuple[List[Tuple[str, str]], Skipped]:
    import pyarrow as pa

    # A missing or non-text column is a wrong --text_field for the whole file: an error, not a skip.
    parquet = _parquet_file(task.path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{task.path}: Parquet file has no column '{text_field}' (columns: {', '.join(names)}); "
                        "name the text column with --text_field")
    column = parquet.read_row_groups(list(range(task.start, task.end)), columns=[text_field]).column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{task.path}: column '{text_field}' holds {column.type}, not text")
    docs: List[Tuple[str, str]] = []
    skipped = Skipped()
    for i, text in enumerate(column.to_pylist()):
        row = task.first_line + i
        if text is None:
            skipped.add("missing_text_field", f"{task.path}: row {row}", f"column '{text_field}' is null", strict)
        elif not text:
            skipped.add("empty_document", f"{task.path}: row {row}", "empty document", strict)
        else:
            docs.append((f"{task.name}:{row}", text))
    return docs, skipped


def iter_sentences(tasks: Sequence[Task], text_field: str = "text", max_bytes: int = 0, skip_document=None,
                   strict: bool = False):
    """Non-empty lines of the documents (tokenizer training input), stopping after `max_bytes`;
    `skip_document(doc_id, text)` leaves documents out (the validation split)."""
    seen = 0
    for task in tasks:
        docs, _ = read_task(task, text_field, strict)
        for doc_id, text in docs:
            if skip_document is not None and skip_document(doc_id, text):
                continue
            for line in text.split("\n"):
                if line:
                    yield line
            seen += len(text)
            if max_bytes and seen >= max_bytes:
                return


def as_list(inputs: Union[Sequence[str], str, None]) -> List[str]:
    """CLI convenience: `--inputs a.txt` gives a string, `--inputs '[a,b]'` / `--inputs+ a` a list."""
    if inputs is None:
        return []
    return [inputs] if isinstance(inputs, str) else list(inputs)


def resolve_files(inputs: Union[Sequence[str], str, None], source: Optional[str], max_bytes: int
                  ) -> Tuple[List[InputFile], List[Dict]]:
    """Files from `--source` (the embedded corpus) and/or `--inputs`, plus a description for the manifest."""
    files: List[InputFile] = []
    described: List[Dict] = []
    if source is not None:
        if source != "python-stdlib":
            raise DataError(f"unknown --source '{source}' (known: python-stdlib)")
        stdlib, info = python_stdlib_files(max_bytes)
        files += stdlib
        described.append(info)
    inputs = as_list(inputs)
    if inputs:
        user = expand_inputs(inputs)
        files += user
        described.append({"name": "inputs", "inputs": list(inputs), "files": len(user),
                          "bytes": sum(f.size for f in user)})
    if not files:
        raise DataError("no input: give --inputs FILES/GLOBS/DIRS and/or --source python-stdlib")
    return files, described
