"""Security defaults: pickle weights need an explicit flag; credentials never reach files or MLflow params."""
from __future__ import annotations

import mlflow
import pytest

from conftest import tiny_run_tree, write_config
from kdlab.distill.config import load_config, redact, save_config
from kdlab.scripts.cli import main as kdlab

SECRET = "s3cret-pw"


@pytest.fixture(scope="module")
def pickle_teacher(tmp_path_factory, tiny_teacher_dir):
    """The tiny teacher saved with pickle weights only (pytorch_model.bin, no safetensors)."""
    import torch
    from transformers import AutoTokenizer, BertModel
    out = tmp_path_factory.mktemp("pickle_teacher")
    model = BertModel.from_pretrained(tiny_teacher_dir)
    model.config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")  # transformers 5 writes only safetensors itself
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(out)
    assert (out / "pytorch_model.bin").is_file() and not list(out.glob("*.safetensors"))
    return str(out)


def test_pickle_weights_are_refused_unless_allowed(tmp_path, pickle_teacher, capsys):
    tree = tiny_run_tree(tmp_path / "run", pickle_teacher, train={"max_steps": 1})
    config = write_config(tmp_path / "c.yaml", tree)
    assert kdlab(["distill", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the tokenizing progress bar
    assert err.startswith("kdlab: error: teacher.source:") and "only pickle weights (pytorch_model.bin)" in err
    assert "teacher.allow_pickle=true" in err
    assert not (tmp_path / "run" / "teacher").exists()

    assert kdlab(["distill", "--config", str(config), "teacher.allow_pickle=true"]) == 0
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def test_credentials_are_masked_in_saved_configs_and_mlflow_params(tmp_path, tiny_teacher_dir):
    url = f"postgresql://kdlab:{SECRET}@127.0.0.1:5432/optuna?sslmode=require"
    tree = tiny_run_tree(tmp_path / "run", tiny_teacher_dir, train={"max_steps": 1}, search={"storage": url})
    config = write_config(tmp_path / "c.yaml", tree)
    assert kdlab(["distill", "--config", str(config)]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert SECRET not in saved and "postgresql://kdlab:***@127.0.0.1:5432/optuna?sslmode=require" in saved
    client = mlflow.MlflowClient(tree["tracking"]["uri"])
    params = [r.data.params for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])]
    assert params and all(SECRET not in str(p) for p in params)
    assert any(p.get("search.storage") == "postgresql://kdlab:***@127.0.0.1:5432/optuna?sslmode=require"
               for p in params)
    # The config object itself keeps the real URL: only what is written out is masked.
    assert load_config(config).search.storage == url
    save_config(load_config(config), tmp_path / "again.yaml")
    assert SECRET not in (tmp_path / "again.yaml").read_text()


@pytest.mark.parametrize("url,shown", [
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("http://user:p%40ss@mlflow.internal:5000", "http://user:***@mlflow.internal:5000"),
    ("https://h/api?token=abc123&x=1", "https://h/api?token=***&x=1"),
    ("sqlite:///runs/mlflow.db", "sqlite:///runs/mlflow.db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
])
def test_redact(url, shown):
    assert redact(url) == shown
