"""What decides whether a fine-tuned teacher can be reused: train.teacher.teacher_key."""
import os
import shutil

from kdlab.distill.config import load_config
from kdlab.train.data import load_task_data
from kdlab.train.teacher import teacher_key

from conftest import SST2, tiny_run_tree, write_config


def _key(tmp_path, train_file, teacher_section=None, **sections):
    tree = tiny_run_tree(tmp_path / "run", "minilm-l6", **sections)
    tree["teacher"].update(teacher_section or {})
    tree["data"]["train_file"] = str(train_file)
    cfg = load_config(write_config(tmp_path / "c.yaml", tree))
    return teacher_key(cfg, load_task_data(cfg.data, cfg.train.seed))


def test_key_follows_the_rows_not_the_file_dates(tmp_path):
    train = tmp_path / "train.tsv"
    lines = (SST2 / "train.tsv").read_text().splitlines(keepends=True)[:301]
    train.write_text("".join(lines))
    first = _key(tmp_path, train)

    # The same bytes written again (a fresh checkout, a re-copied data folder): same teacher.
    shutil.copy(train, tmp_path / "copy.tsv")
    os.replace(tmp_path / "copy.tsv", train)
    os.utime(train, (1_000_000_000, 1_000_000_000))
    assert _key(tmp_path, train) == first

    # One label flipped in one row: another teacher.
    header, row, *rest = lines
    text, label = row.rstrip("\n").rsplit("\t", 1)
    train.write_text("".join([header, f"{text}\t{1 - int(label)}\n", *rest]))
    assert _key(tmp_path, train) != first


def test_key_follows_the_fine_tuning_recipe(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("".join((SST2 / "train.tsv").read_text().splitlines(keepends=True)[:301]))
    assert _key(tmp_path, train) != _key(tmp_path, train, teacher_section={"learning_rate": 5e-4})
    assert _key(tmp_path, train) == _key(tmp_path, train, student={"num_layers": 2})  # the student is not the teacher
