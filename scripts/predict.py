"""Batch inference over an export folder: a TSV/CSV/JSONL/text file in, one JSON line per row out.

    kdlab predict --model runs/sst2_minilm/export --input reviews.tsv --output labels.jsonl [--batch-size 64]

The model is the export's served artefact (`distill.export.load_served`: ONNX int8, dynamic int8, ...),
not its fp32 weights, so the labels are the ones the gate and the export measured. The input is
streamed a batch at a time, so files larger than memory work:

- .tsv / .csv: a header line naming the columns (TSV fields are read literally, as training reads
  GLUE files; CSV follows the usual quoting); blank lines are not rows;
- .jsonl / .json: one JSON object per line; blank lines are not rows;
- .txt: one text per line, every line a row (an empty line is an empty text).

The text (and, for pair tasks, the second text) column defaults to the export's `text_column` /
`text_pair_column`. Each output line is `{"row": i, "label": ..., "probs": {label: p, ...}}`, rows
0-based in input order. Lines are appended to OUTPUT.partial and flushed batch by batch; a finished
run renames it to OUTPUT. Rerunning after an interruption resumes from the complete lines of
OUTPUT.partial, so OUTPUT holds every row exactly once.

int8 recipes quantize activations per batch, so a row's probabilities can differ in the last
decimals between batch sizes; a resumed run keeps the batch boundaries of an uninterrupted one.

scripts/cli.py defines the command's arguments and imports this module only when `predict` runs: it
loads torch and the export's runtime, which `kdlab --help` must not.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from kdlab.distill.errors import ConfigError, ExportError
from kdlab.distill.export import load_served
from kdlab.distill.quantize import RecipeUnavailable
from kdlab.eval.latency import clamp_threads

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
VALID_FORMATS = (".tsv or .csv with a header line naming the columns, .jsonl/.json with one JSON object per line, "
                 ".txt with one text per line")
PROB_DECIMALS = 6
PARTIAL_SUFFIX = ".partial"


class PredictInputError(ConfigError):
    """An input or output file the user can fix; the message is one line naming the file, the line and what is valid.

    A ConfigError, so `kdlab` prints it as `kdlab: error: ...` and exits 2.
    """


# ---------------------------------------------------------------- reading the input, one line at a time


@dataclass
class Cursor:
    """How far a reader has got: the physical line last read and the bytes consumed (errors and progress).

    With `skip` set, a malformed row becomes a BadRow (its output line says why) instead of stopping
    the run; a problem with the file as a whole (header, format) still stops it.
    """

    line: int = 0
    bytes: int = 0
    skip: bool = False
    undecodable: dict = field(default_factory=dict)  # line -> message, for lines that are not UTF-8 (skip mode)


@dataclass
class BadRow:
    """A malformed input row, kept in its place so output row i is still input row i."""

    message: str


def _row_error(cursor: Cursor, message: str) -> BadRow:
    if cursor.skip:
        return BadRow(message)
    raise PredictInputError(message)


def input_format(path: Path) -> str:
    """The reader for `path` by its extension; checks it exists and is not empty."""
    if not path.is_file():
        raise PredictInputError(f"{path}: input file not found")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PredictInputError(f"{path}: unknown input format '{path.suffix}'; valid: {VALID_FORMATS}")
    if path.stat().st_size == 0:
        raise PredictInputError(f"{path}: empty file; valid: {VALID_FORMATS}")
    return fmt


def _lines(path: Path, cursor: Cursor) -> Iterator[str]:
    # Binary lines decoded one at a time: a text-mode file decodes 8 KB blocks, so its
    # UnicodeDecodeError could not say which line holds the bad byte.
    with open(path, "rb") as fh:
        for raw in fh:
            cursor.line += 1
            cursor.bytes += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                message = (f"{path}: line {cursor.line}: byte 0x{raw[exc.start]:02x} at position {exc.start + 1} is "
                           f"not UTF-8; valid: UTF-8 text (convert it, e.g. iconv -f latin1 -t utf-8)")
                if not cursor.skip or cursor.line == 1:
                    raise PredictInputError(message) from None
                cursor.undecodable[cursor.line] = message
                text = "\n"  # a placeholder the row readers turn into a BadRow
            yield text.removeprefix("\ufeff") if cursor.line == 1 else text


def _column(path: Path, header: list[str], name: str, option: str) -> int:
    if name not in header:
        raise PredictInputError(f"{path}: line 1: no column '{name}' (choose one with {option}); "
                                f"columns: {', '.join(header) or '(none)'}")
    return header.index(name)


def _table_rows(path: Path, fmt: str, text_column: str, pair_column: str | None,
                cursor: Cursor) -> Iterator[tuple[str, str | None]]:
    lines = _lines(path, cursor)
    # GLUE TSVs hold bare quote characters inside sentences: TSV fields are read literally, as
    # train/data.py reads them for training.
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(lines)
    hint = "no tab inside a field" if fmt == "tsv" else "quote fields that contain commas"
    try:
        header = [name.strip() for name in next(reader, [])]
        text_at = _column(path, header, text_column, "--text-column")
        pair_at = None if pair_column is None else _column(path, header, pair_column, "--pair-column")
        for fields in reader:
            if cursor.line in cursor.undecodable:
                yield BadRow(cursor.undecodable.pop(cursor.line))
                continue
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(header):
                yield _row_error(cursor, f"{path}: line {cursor.line}: {len(fields)} fields where the header has "
                                         f"{len(header)}; valid: one field per header column ({hint})")
                continue
            yield fields[text_at], None if pair_at is None else fields[pair_at]
    except csv.Error as exc:
        raise PredictInputError(f"{path}: line {cursor.line}: {exc}; valid: {fmt.upper()} with {hint}") from None


def _jsonl_rows(path: Path, text_column: str, pair_column: str | None,
                cursor: Cursor) -> Iterator[tuple[str, str | None]]:
    seen_record = False
    for line in _lines(path, cursor):
        if cursor.line in cursor.undecodable:
            yield BadRow(cursor.undecodable.pop(cursor.line))
            continue
        if not line.strip():
            continue
        if not seen_record and line.lstrip().startswith("["):
            raise PredictInputError(f"{path}: line {cursor.line}: a JSON array, not JSON lines; valid: one JSON "
                                    f"object per line (convert with jq -c '.[]')")
        seen_record = True
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield _row_error(cursor, f"{path}: line {cursor.line}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                     f"valid: one JSON object per line")
            continue
        if not isinstance(record, dict):
            yield _row_error(cursor, f"{path}: line {cursor.line}: a JSON {type(record).__name__}, not an object; "
                                     f"valid: one JSON object per line, e.g. {{\"{text_column}\": \"...\"}}")
            continue
        values, problem = [], None
        for key in (text_column, pair_column):
            if key is None:
                values.append(None)
            elif key not in record:
                problem = (f"{path}: line {cursor.line}: no key '{key}'; keys: {', '.join(record)} "
                           f"(choose with --text-column / --pair-column)")
            elif not isinstance(record[key], str):
                problem = (f"{path}: line {cursor.line}: '{key}' is a JSON "
                           f"{type(record[key]).__name__}; valid: a string")
            else:
                values.append(record[key])
        if problem:
            yield _row_error(cursor, problem)
            continue
        yield values[0], values[1]


def _text_rows(path: Path, pair_column: str | None, cursor: Cursor) -> Iterator[tuple[str, str | None]]:
    if pair_column is not None:
        raise PredictInputError(f"{path}: a .txt file holds one text per line, but this model reads text pairs "
                                f"(second text: '{pair_column}'); valid: .tsv, .csv or .jsonl with both columns")
    for line in _lines(path, cursor):
        if cursor.line in cursor.undecodable:
            yield BadRow(cursor.undecodable.pop(cursor.line))
            continue
        yield line.rstrip("\r\n"), None


def read_rows(path: str | Path, text_column: str | None, pair_column: str | None = None,
              cursor: Cursor | None = None) -> Iterator[tuple[str, str | None]]:
    """(text, pair or None) per input row, read lazily one line at a time; PredictInputError on bad input."""
    path = Path(path)
    fmt = input_format(path)
    cursor = cursor if cursor is not None else Cursor()
    if fmt == "txt":
        rows = _text_rows(path, pair_column, cursor)
    elif text_column is None:
        raise PredictInputError(f"{path}: which column holds the text? the export's manifest names no text_column; "
                                f"pass --text-column")
    elif fmt == "jsonl":
        rows = _jsonl_rows(path, text_column, pair_column, cursor)
    else:
        rows = _table_rows(path, fmt, text_column, pair_column, cursor)
    count = 0
    for row in rows:
        count += 1
        yield row
    if count == 0:
        raise PredictInputError(f"{path}: no rows{' after the header' if fmt in ('tsv', 'csv') else ''}; "
                                f"valid: {VALID_FORMATS}")


def batches(rows: Iterator, first: int, size: int) -> Iterator[list]:
    """Lists of `size` rows, the first of `first` rows."""
    n = first
    while batch := list(islice(rows, n)):
        yield batch
        n = size


# ---------------------------------------------------------------- the output and resuming it


def partial_path(output_path: str | Path) -> Path:
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + PARTIAL_SUFFIX)


def complete_rows(partial: Path, labels: list[str]) -> tuple[int, int]:
    """(complete lines, byte offset where they end) of an interrupted run's OUTPUT.partial.

    A last line without its newline was torn by the interruption; the caller cuts it off.
    """
    count = end = offset = 0
    last = b""
    with open(partial, "rb") as fh:
        for raw in fh:
            offset += len(raw)
            if raw.endswith(b"\n"):
                count, end, last = count + 1, offset, raw
    if count:
        try:
            record = json.loads(last)
            ours = record["row"] == count - 1 and ("error" in record or (
                "output" in record if not labels else sorted(record["probs"]) == sorted(labels)))
        except (ValueError, KeyError, TypeError):
            ours = False
        if not ours:
            raise PredictInputError(f"{partial}: line {count} is not row {count - 1} of this model's output, so this "
                                    f"is not an interrupted run of the same command; delete it or pass --no-resume")
    return count, end


def rounded(record: dict) -> dict:
    """A task's prediction record with its class probabilities (if any) rounded to PROB_DECIMALS."""
    if "probs" not in record:
        return record
    return {**record, "probs": {name: round(p, PROB_DECIMALS) for name, p in record["probs"].items()}}


def output_lines(first_row: int, records: list[dict], bad: dict[int, str] | None = None) -> str:
    """JSON lines for one batch: {"row", **the task's record} ({"row", "label", "probs"}; {"row", "output"} for a
    generator); `bad` maps a position in the batch to the error of a skipped row ({"row", "error"})."""
    bad = bad or {}
    predicted = iter(records)
    lines = []
    for i in range(len(records) + len(bad)):
        record = {"row": first_row + i, "error": bad[i]} if i in bad else {"row": first_row + i,
                                                                             **rounded(next(predicted))}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


# ---------------------------------------------------------------- the run


@contextmanager
def _without_transformers_progress_bars():
    # from_pretrained draws its own "Loading weights" bar; the one bar on stderr should be predict's.
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def run_predict(model_dir, input_path, output_path, batch_size: int = 64, text_column: str | None = None,
                pair_column: str | None = None, resume: bool = True, threads: int | None = None,
                progress: bool = True, on_error: str = "stop") -> dict:
    """Label every row of `input_path` with the export in `model_dir`, writing JSON lines to `output_path`.

    Returns rows, predicted (this call), resumed_from, seconds, rows_per_second (this call's rows),
    load_seconds, output, recipe, device, threads, batch_size.
    Raises PredictInputError (a ConfigError) for bad input, ExportError for a bad export folder.
    on_error='skip' writes {"row": i, "error": "<file>: line N: ..."} for a malformed row and goes on
    (counted in `skipped`); 'stop' (default) stops at the first one.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if on_error not in ("stop", "skip"):
        raise PredictInputError(f"--on-error: '{on_error}'; valid: stop, skip")
    if batch_size < 1:
        raise PredictInputError(f"--batch-size: must be >= 1, got {batch_size}")
    input_format(input_path)  # a missing, empty or unknown file fails before the model loads
    if output_path.resolve() == input_path.resolve():
        raise PredictInputError(f"{output_path}: the output would overwrite the input; valid: another file name")
    partial = partial_path(output_path)
    threads, warning = clamp_threads(threads if threads is not None else os.cpu_count() or 1)
    if warning:
        print(f"predict: {warning}", file=sys.stderr)

    started = time.perf_counter()
    with _without_transformers_progress_bars():
        served = load_served(model_dir, threads=threads)
    manifest = served.manifest
    text_column = text_column or manifest.get("text_column")
    pair_column = pair_column or manifest.get("text_pair_column")
    load_seconds = time.perf_counter() - started

    resumed, end = complete_rows(partial, served.labels) if resume and partial.is_file() else (0, 0)
    cursor = Cursor(skip=on_error == "skip")
    rows = read_rows(input_path, text_column, pair_column, cursor)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    bar = tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, desc="predict",
               disable=not progress, file=sys.stderr)
    started, written, skipped_rows = time.perf_counter(), resumed, 0
    try:
        skipped = sum(1 for _ in islice(rows, resumed))
        if skipped < resumed:
            raise PredictInputError(f"{partial}: holds {resumed:,} rows but {input_path} has only {skipped:,}, so "
                                    f"it belongs to another input; delete it or pass --no-resume")
        if resumed:
            os.truncate(partial, end)  # drop the torn last line
        with open(partial, "a" if resumed else "w", encoding="utf-8") as out:
            # After a resume the first batch is shortened so that every later batch holds the same
            # rows as in an uninterrupted run (int8 activation scales are per batch).
            for batch in batches(rows, batch_size - resumed % batch_size, batch_size):
                bad = {i: row.message for i, row in enumerate(batch) if isinstance(row, BadRow)}
                good = [row for row in batch if not isinstance(row, BadRow)]
                for message in bad.values():
                    skipped_rows += 1
                    if skipped_rows <= 10:
                        tqdm.write(f"predict: skipped {message}", file=sys.stderr)
                texts = [text for text, _ in good]
                pairs = [pair for _, pair in good] if pair_column is not None else None
                out.write(output_lines(written, served.predict_records(texts, pairs) if good else [], bad))
                out.flush()
                written += len(batch)
                bar.set_postfix_str(f"{written:,} rows", refresh=False)
                bar.update(cursor.bytes - bar.n)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, output_path)
    except PredictInputError:
        if not resumed:
            partial.unlink(missing_ok=True)  # a fresh run on bad input leaves nothing behind
        raise
    finally:
        bar.close()
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - started
    predicted = written - resumed
    return {"rows": written, "predicted": predicted, "resumed_from": resumed, "seconds": seconds,
            "rows_per_second": predicted / seconds if seconds > 0 else float("nan"), "load_seconds": load_seconds,
            "output": str(output_path), "recipe": served.artefact.recipe, "device": served.artefact.device,
            "threads": threads, "batch_size": batch_size, "skipped": skipped_rows}


def summary_line(summary: dict) -> str:
    resumed = f" ({summary['resumed_from']:,} from an earlier run)" if summary["resumed_from"] else ""
    skipped = f", {summary['skipped']:,} malformed rows skipped" if summary.get("skipped") else ""
    return (f"predict: {summary['rows']:,} rows{resumed}{skipped} in {summary['seconds']:.1f} s "
            f"({summary['rows_per_second']:,.0f} rows/s; {summary['recipe']} on {summary['device']}, "
            f"batch {summary['batch_size']}, {summary['threads']} threads) -> {summary['output']}")


# ---------------------------------------------------------------- the command line (`kdlab predict`)


def main(args) -> int:
    """`kdlab predict`: 0 when OUTPUT is complete, 130 when interrupted (rerun to resume).

    Bad input and a bad export folder raise ConfigError: `kdlab` prints it in one line and exits 2.
    """
    try:
        summary = run_predict(args.model, args.input, args.output, batch_size=args.batch_size,
                              text_column=args.text_column, pair_column=args.pair_column, resume=args.resume,
                              threads=args.threads, progress=args.progress, on_error=args.on_error)
    except ExportError as exc:
        raise ConfigError(str(exc)) from None
    except RecipeUnavailable as exc:
        raise ConfigError(f"{args.model}: the export's served recipe cannot run here: {exc}") from None
    except KeyboardInterrupt:
        print(f"\npredict: interrupted; rerun the same command to resume from {partial_path(args.output)}",
              file=sys.stderr)
        return 130
    print(summary_line(summary), flush=True)
    return 0
