"""Every supported data format, sentence pairs, label names, and the errors users meet."""
import json

import datasets
import pandas as pd
import pytest
from transformers import AutoTokenizer

from kdlab.distill.config import ConfigError, DataConfig
from kdlab.train.data import load_task_data, load_test_split, make_loader, tokenize

from conftest import SST2

ROWS = [("a fine film", "pos"), ("dull and long", "neg"), ("we loved it", "pos"), ("never again", "neg")]


def write_rows(path, fmt):
    df = pd.DataFrame(ROWS, columns=["text", "sentiment"])
    if fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"text": t, "sentiment": s}) for t, s in ROWS))
    elif fmt == "json":
        df.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["tsv", "csv", "json", "jsonl", "parquet"])
def test_every_format_loads_with_named_labels(tmp_path, fmt):
    f = write_rows(tmp_path / f"d.{fmt}", fmt)
    data = load_task_data(DataConfig(train_file=str(f), eval_file=str(f), text_column="text",
                                     label_column="sentiment"))
    assert data.label_names == ["neg", "pos"]
    assert data.train["text"] == [t for t, _ in ROWS]


def test_sentence_pairs_and_per_batch_padding(tmp_path, minilm_dir):
    f = tmp_path / "pairs.csv"
    pd.DataFrame({"q": ["is it good", "what"], "a": ["yes it is very very good indeed", "no"],
                  "y": [1, 0]}).to_csv(f, index=False)
    cfg = DataConfig(train_file=str(f), eval_file=str(f), text_column="q", text_pair_column="a", label_column="y")
    data = load_task_data(cfg)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ds = tokenize(data.train, tok, cfg, data.label_names)
    assert ds[0]["token_type_ids"].count(1) > 0  # the pair's second segment
    batch = next(iter(make_loader(ds, tok, batch_size=2, shuffle=False)))
    assert batch["input_ids"].shape[1] == max(len(ds[0]["input_ids"]), len(ds[1]["input_ids"]))
    assert batch["labels"].tolist() == [1, 0] and batch["idx"].tolist() == [0, 1]


def test_real_sst2_slice_is_shuffled_deterministically():
    cfg = DataConfig(train_file=str(SST2 / "train.tsv"), eval_file=str(SST2 / "dev.tsv"),
                     max_train_samples=100, max_eval_samples=50)
    a, b = load_task_data(cfg, seed=1), load_task_data(cfg, seed=1)
    assert len(a.train) == 100 and len(a.eval) == 50 and a.label_names == ["0", "1"]
    assert a.train["sentence"] == b.train["sentence"]
    assert load_task_data(cfg, seed=2).train["sentence"] != a.train["sentence"]


def test_quotes_in_tsv_are_literal(tmp_path):
    f = tmp_path / "q.tsv"
    f.write_text('sentence\tlabel\n" a quoted start\t1\nplain\t0\n')
    data = load_task_data(DataConfig(train_file=str(f), eval_file=str(f)))
    assert data.train["sentence"][0] == '" a quoted start' and len(data.train) == 2


def test_errors_name_the_problem(tmp_path):
    f = write_rows(tmp_path / "d.csv", "csv")
    with pytest.raises(ConfigError, match=r"data.train_file: file not found: .*missing.tsv"):
        load_task_data(DataConfig(train_file=str(tmp_path / "missing.tsv"), eval_file=str(f)))
    with pytest.raises(ConfigError, match="column 'sentence' not in .*d.csv; columns: text, sentiment"):
        load_task_data(DataConfig(train_file=str(f), eval_file=str(f), label_column="sentiment"))
    with pytest.raises(ConfigError, match=r"unsupported format '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_task_data(DataConfig(train_file=str(tmp_path / "d.txt"), eval_file=str(f)))


def test_the_test_split_is_read_with_the_training_labels(tmp_path):
    """data.test_file: read as train_file is, labels encoded as training encoded them (class names, indices where
    training held integers, a Hub-style ClassLabel by its names); unlabelled or unseen labels are one line each."""
    train = write_rows(tmp_path / "train.tsv", "tsv")
    test = tmp_path / "test.tsv"
    test.write_text("text\tsentiment\nso good\tpos\nso bad\tneg\n")
    cfg = DataConfig(train_file=str(train), eval_file=str(train), test_file=str(test), text_column="text",
                     label_column="sentiment")
    data = load_task_data(cfg)
    assert load_test_split(DataConfig(train_file=str(train), eval_file=str(train)), data) is None
    assert load_test_split(cfg, data)["sentiment"] == ["pos", "neg"]  # tokenize maps them by data.label_names

    classes = datasets.Features({"text": datasets.Value("string"),
                                 "sentiment": datasets.ClassLabel(names=["pos", "neg"])})  # another order than training's
    hub = tmp_path / "hub.parquet"
    datasets.Dataset.from_dict({"text": ["x", "y"], "sentiment": [0, 1]}, features=classes).to_parquet(hub)
    assert load_test_split(DataConfig(**{**cfg.__dict__, "test_file": str(hub)}), data)["sentiment"] == ["pos", "neg"]
    unlabelled = tmp_path / "glue_test.parquet"  # GLUE's test splits: label -1
    datasets.Dataset.from_dict({"text": ["x"], "sentiment": [-1]}, features=classes).to_parquet(unlabelled)
    with pytest.raises(ConfigError, match=r"^data.test_file: .*glue_test.parquet has rows without a label"):
        load_test_split(DataConfig(**{**cfg.__dict__, "test_file": str(unlabelled)}), data)

    numbered = tmp_path / "num_train.tsv"
    numbered.write_text("text\tsentiment\na\t0\nb\t1\nc\t2\n")
    ints = DataConfig(train_file=str(numbered), eval_file=str(numbered), test_file=str(numbered), text_column="text",
                      label_column="sentiment")
    assert load_test_split(ints, load_task_data(ints))["sentiment"] == [0, 1, 2]
    test.write_text("text\tsentiment\nso good\tpos\nodd\tmixed\nodder\t7\n")
    with pytest.raises(ConfigError) as err:
        load_test_split(cfg, data)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"data.test_file: {test} has label(s) ['7', 'mixed'] that never "
                                                       f"occur in the training rows (labels there: neg, pos)")
