"""Paths as results record them: portable, never an absolute path of the machine that ran them.

Manifests, model cards and benchmark JSON are read on other machines, so a path in them is written
relative to something both machines have. `portable_path` tries, in order:

1. inside the repository (the checkout holding kdlab; the working folder when kdlab is installed):
   relative to its root, e.g. `runs/sst2_minilm/trials/3`, `configs/sst2_minilm.yaml`;
2. inside the data root (`$KDLAB_DATA_DIR`, default `../shared/data` beside the repository, where
   the real data lives): `<data>/sst2/dev.tsv`;
3. inside a root the caller names (`portable_path(p, run=cfg.run_dir)`): `<run>/trials/3`;
4. a relative path outside all of these: as the user gave it (`../teachers/minilm`);
5. any other absolute path: its last component behind a marker, `<local>/tiny_teacher`.

A string that names no local file and is not absolute (a Hub id such as `google/flan-t5-base`, a
named teacher such as `minilm-l6`) is returned as given. `portable_text` rewrites every absolute
path inside a string (a command line, an override `output_dir=/tmp/x`, a message), and
`portable_record` every string of a JSON-like tree, for benchmark writers.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

LOCAL = "<local>"  # marker of a folder that exists only on the machine that ran
# An absolute path in free text: after the start, a space, '=', a quote, a bracket or `sqlite:///` (not after
# other text: `requests/s`, `models:/name` and URLs are not paths); it runs to the next space, quote or bracket.
_IN_TEXT = re.compile(r"(^|[\s='\"(\[,]|sqlite:///)(/[^\s'\"()\[\],;]+)")


def repo_root() -> Path:
    """The checkout holding the kdlab package (pyproject.toml beside it), else the current folder."""
    here = Path(__file__).resolve().parents[1]  # eval/ is mapped to kdlab.eval: its parent is the checkout
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def data_root() -> Path:
    return Path(os.environ.get("KDLAB_DATA_DIR") or repo_root().parent / "shared" / "data")


def _relative(path: Path, root: Path) -> str | None:
    for p, r in ((path, root), (path.resolve(), root.resolve())):  # as written, then with links followed
        try:
            return p.relative_to(r).as_posix()
        except ValueError:
            continue
    return None


def portable_path(path, **roots) -> str | None:
    """`path` as a result records it (rules in the module docstring); None stays None.

    `roots` are extra named folders, e.g. run=cfg.run_dir gives `<run>/trials/3`.
    """
    if path is None:
        return None
    text = os.fspath(path)
    if not text:
        return text
    given = Path(text).expanduser()
    if not given.is_absolute() and not given.exists():
        return text  # a Hub id, a named teacher, or a file that is not here: nothing local to hide
    where = Path(os.path.abspath(given))
    inside = _relative(where, repo_root())
    if inside is not None:
        return inside or "."
    for marker, root in (("data", data_root()), *roots.items()):
        if root is None:
            continue
        inside = _relative(where, Path(os.path.abspath(Path(root).expanduser())))
        if inside is not None:
            return f"<{marker}>" + (f"/{inside}" if inside not in ("", ".") else "")
    return text if not given.is_absolute() else f"{LOCAL}/{where.name}"


def portable_text(text: str, **roots) -> str:
    """`text` with every absolute path in it made portable (a closing '.', ':' or ';' stays outside the path)."""
    def one(m: re.Match) -> str:
        found = m.group(2)
        stop = found[len(found.rstrip(".:;")):]
        return m.group(1) + portable_path(found[:len(found) - len(stop)], **roots) + stop
    return _IN_TEXT.sub(one, text)


def portable_record(value, **roots):
    """A JSON-like tree (dicts, lists, strings, numbers) with every path in its strings made portable."""
    if isinstance(value, str):
        return portable_text(value, **roots)
    if isinstance(value, dict):
        return {k: portable_record(v, **roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_record(v, **roots) for v in value]
    if isinstance(value, os.PathLike):
        return portable_path(value, **roots)
    return value
