"""The shared part of the benchmark drivers: each owns one marked section of benchmarks/README.md.

Their JSON goes through `write_result`, so no result records an absolute path of the machine that ran it
(kdlab.eval.paths: `configs/...`, `<data>/sst2/train.tsv`, `<work>/...` for a driver's scratch folder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kdlab.eval.paths import portable_record

README = Path(__file__).resolve().parents[1] / "benchmarks" / "README.md"


def write_readme_section(marker: str, heading: str, text: str, path: Path = README) -> None:
    """Replace only the `<!-- marker:start/end -->` section (other benchmarks own the rest)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in body and end in body:
        body = body[:body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(body)
    os.replace(tmp, path)  # never leave a half-written README for another benchmark to read


def write_result(path: Path, result: dict, **roots) -> None:
    """A benchmark's JSON, every path in it portable (`roots`: named folders, e.g. work=the scratch folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(portable_record(result, **roots), indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a later stage or another reader never sees half a file


def publish(result: dict, text: str, *, marker: str, heading: str, out: Path, readme: Path, script: str,
            **roots) -> None:
    """Write a benchmark's JSON and its README section, echo the section, and say where both went."""
    write_result(out, result, **roots)
    write_readme_section(marker, heading, text, path=readme)
    print(text)
    print(f"{script}: wrote {out} and the {marker} section of {readme} in {result['seconds']:.0f} s")
