"""From YAML and `key.sub=value` overrides to typed dataclasses, and back to plain data for saving.

Library module for distill/config.py (`load_config` is there: it builds the `Config` with `build` and
checks it); nothing to launch. This half knows dataclasses, not kdlab's sections:

- `read_tree(path, overrides)`: the YAML file as a dict, overrides applied (one-line ConfigErrors for
  a missing file, invalid YAML, a non-mapping, an override without '=');
- `build(cls, tree, label)`: a dataclass tree, every key checked against the fields (an unknown key is
  an error that names it and lists the valid ones) and every value against the field's type;
- `to_dict`, `flatten`, `save_config`: the resolved form saved to config.yaml and logged to MLflow,
  with credentials masked by `redact`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from kdlab.distill.errors import ConfigError

# ---------------------------------------------------------------- reading


def _parse_override(text: str):
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def read_tree(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """The YAML file at `path` (None: no file, only defaults) as a dict, with `key.sub=value` overrides applied."""
    tree: dict = {}
    if path is not None:
        label = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"{label}: config file not found")
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            at = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{label}: not valid YAML{at}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{label}: top level must be a mapping of sections")
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(tree, key, value)
    return tree


# ---------------------------------------------------------------- building typed dataclasses


def _coerce(value, tp, where: str):
    """Check (and gently convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _coerce(value, next(a for a in typing.get_args(tp) if a is not type(None)), where)
    if tp is Any:
        return value
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if (tp is list or origin is list) and not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def build(cls, data, label: str, prefix: str = ""):
    """An instance of dataclass `cls` from a mapping, nested dataclass fields built from sub-mappings.

    Fields marked `internal` in their metadata cannot be set from a file. Errors start with `label`
    (the file) and name the dotted key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{label}: unknown key '{prefix}{key}'; valid keys: {', '.join(sorted(fields))}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build(hints[key], value or {}, label, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{label}: {prefix}{key}")
    return cls(**kwargs)


# ---------------------------------------------------------------- the resolved form, credentials masked

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
_URL_SECRET_PARAM = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token|secret|access_token|api_key)=)[^&\s]+",
                               re.IGNORECASE)


def redact(value: str) -> str:
    """A URL with its password (and secret query parameters) replaced by ***: what logs and files may show."""
    return _URL_SECRET_PARAM.sub(r"\g<head>***", _URL_PASSWORD.sub(r"\g<head>***@", value))


def _redacted_tree(value):
    if isinstance(value, dict):
        return {k: _redacted_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted_tree(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def to_dict(cfg) -> dict:
    """The resolved config as plain data (what is saved to config.yaml and logged), credentials masked."""
    out = dataclasses.asdict(cfg)
    out.pop("config_path", None)
    out["output_dir"] = str(cfg.run_dir)
    return _redacted_tree(out)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: the form MLflow params take."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def save_config(cfg, path: Path) -> None:
    """The resolved config (`to_dict`) as YAML at `path`."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
