"""Parallel text for seq2seq tasks: line-aligned files, TSV/CSV/JSON(L)/Parquet columns, or a Hub dataset.

    data:
      train_file: ../shared/data/multi30k/train.de          # source side, one sentence per line
      train_target_file: ../shared/data/multi30k/train.en   # target side, line N pairs with line N
      eval_file: ../shared/data/multi30k/test.de
      eval_target_file: ../shared/data/multi30k/test.en

Every split becomes a `datasets.Dataset` with `source` and `target` string columns; tokenization
adds `idx` (the row's position) so cached teacher outputs can be looked up per row. Batches are
padded per batch; label padding is -100 (ignored by every loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import DataCollatorForSeq2Seq

from kdlab.distill.config import ConfigError, DataConfig
from kdlab.train.data import FORMATS, load_file, load_splits, subsample


@dataclass
class Seq2SeqData:
    train: datasets.Dataset  # columns: source, target
    eval: datasets.Dataset
    label_names: tuple = ()  # none: the teacher key (train/teacher.py) hashes them


def _read_lines(path: str, key: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.{key}: file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data.{key}: {path} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at byte offset "
                          f"{exc.start}); valid: UTF-8 text") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()  # the newline(s) after the last line (Multi30k's files end with a blank line)
    if not lines:
        raise ConfigError(f"data.{key}: {path} is empty")
    return lines


def _pairs_from_lines(source_file: str, target_file: str, source_key: str, target_key: str) -> datasets.Dataset:
    sources = _read_lines(source_file, source_key)
    targets = _read_lines(target_file, target_key)
    if len(sources) != len(targets):
        raise ConfigError(f"data.{target_key}: {target_file} has {len(targets)} lines but data.{source_key} "
                          f"{source_file} has {len(sources)}; line-aligned pairs need the same line count")
    _check_not_empty(sources, source_file, source_key)
    _check_not_empty(targets, target_file, target_key)
    return datasets.Dataset.from_dict({"source": sources, "target": targets})


def _check_not_empty(texts: list, where: str, key: str) -> None:
    for i, text in enumerate(texts):
        if text is None or not str(text).strip():
            raise ConfigError(f"data.{key}: {where} has an empty text at line {i + 1}; every pair needs a source "
                              f"and a target (remove the pair from both sides)")


def _column(ds: datasets.Dataset, name: str, key: str, where: str) -> list:
    """Values of `name`; 'a.b' reads key b of the dict column a (Hub translation datasets)."""
    head, _, sub = name.partition(".")
    if head not in ds.column_names:
        raise ConfigError(f"data.{key}: column '{head}' not in {where}; columns: {', '.join(ds.column_names)}")
    values = ds[head]
    if sub:
        if not all(isinstance(v, dict) and sub in v for v in values[:1]):
            raise ConfigError(f"data.{key}: column '{head}' of {where} holds no key '{sub}'")
        values = [v.get(sub) if isinstance(v, dict) else None for v in values]
    return values


def _pairs_from_columns(ds: datasets.Dataset, cfg: DataConfig, where: str, file_key: str) -> datasets.Dataset:
    sources = _column(ds, cfg.source_column, "source_column", where)
    targets = _column(ds, cfg.target_column, "target_column", where)
    _check_not_empty(sources, f"{where} column '{cfg.source_column}'", file_key)
    _check_not_empty(targets, f"{where} column '{cfg.target_column}'", file_key)
    return datasets.Dataset.from_dict({"source": [str(s) for s in sources], "target": [str(t) for t in targets]})


def load_seq2seq_data(cfg: DataConfig, seed: int = 42) -> Seq2SeqData:
    """Both splits as source/target pairs, checked; no tokenization yet."""
    if cfg.train_target_file:
        train = _pairs_from_lines(cfg.train_file, cfg.train_target_file, "train_file", "train_target_file")
        dev = _pairs_from_lines(cfg.eval_file, cfg.eval_target_file, "eval_file", "eval_target_file")
    else:
        raw_train, raw_dev = load_splits(cfg)
        where = (cfg.train_file, cfg.eval_file) if cfg.train_file else \
            (f"{cfg.dataset}[{cfg.train_split}]", f"{cfg.dataset}[{cfg.eval_split}]")
        key = ("train_file", "eval_file") if cfg.train_file else ("dataset", "dataset")
        train = _pairs_from_columns(raw_train, cfg, where[0], key[0])
        dev = _pairs_from_columns(raw_dev, cfg, where[1], key[1])
    train, dev = subsample(train, dev, cfg, seed)
    return Seq2SeqData(train=train, eval=dev)


def load_seq2seq_test(cfg: DataConfig) -> datasets.Dataset | None:
    """The held-out test pairs (data.test_file: a table with source_column and target_column; or data.test_split of
    data.dataset) as `source`/`target`; None without one. Read only by the export, never by the gate or the search."""
    if not (cfg.test_file or cfg.test_split):
        return None
    if cfg.test_file:
        if Path(cfg.test_file).suffix.lower() not in FORMATS:  # line-aligned text: the target side has no key
            raise ConfigError(f"data.test_file: {cfg.test_file} is not a table; a seq2seq test split is one file with "
                              f"columns '{cfg.source_column}' and '{cfg.target_column}' (valid: "
                              f"{', '.join(FORMATS)}), since line-aligned test pairs have no target-file key")
        return _pairs_from_columns(load_file(cfg.test_file, "data.test_file"), cfg, cfg.test_file, "test_file")
    where = f"{cfg.dataset}[{cfg.test_split}]"
    try:
        raw = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.test_split)
    except Exception as exc:  # datasets raises many types for a split it cannot load
        raise ConfigError(f"data.test_split: cannot load '{where}': {str(exc).splitlines()[0]}") from None
    return _pairs_from_columns(raw, cfg, where, "test_split")


def check_tokenizer(tokenizer, source: str) -> None:
    """A seq2seq tokenizer must pad batches and end targets; say which token is missing."""
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"teacher.source: the tokenizer of {source} has no pad token; seq2seq batches need one "
                          f"(set tokenizer.pad_token and save it with the model)")
    if end_token_id(tokenizer) is None:
        raise ConfigError(f"teacher.source: the tokenizer of {source} has no end-of-sequence token (eos or sep); "
                          f"generation could never stop (set tokenizer.eos_token and save it with the model)")


def end_token_id(tokenizer) -> int | None:
    """The token that ends a target: EOS, or [SEP] for BERT-family vocabularies."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def tokenize_pairs(ds: datasets.Dataset, tokenizer, cfg: DataConfig, decoder_start_token_id: int | None,
                   targets: list[str] | None = None) -> datasets.Dataset:
    """input_ids/attention_mask of prefix + source, labels of the target (or `targets`), idx; cached by datasets.

    A target that the tokenizer starts with the decoder's start token ([CLS] for BERT vocabularies)
    loses it: the decoder is fed that token and must not learn to predict it again.
    """
    if targets is not None:
        ds = ds.remove_columns("target").add_column("target", targets)

    def encode(batch, indices):
        sources = [cfg.source_prefix + s for s in batch["source"]]
        # T5's generate rejects token_type_ids (STACK.md); no seq2seq model here uses them.
        out = tokenizer(sources, truncation=True, max_length=cfg.max_length, return_token_type_ids=False)
        labels = tokenizer(text_target=batch["target"], truncation=True, max_length=cfg.max_target_length,
                           return_token_type_ids=False)["input_ids"]
        if decoder_start_token_id is not None:
            labels = [ids[1:] if ids and ids[0] == decoder_start_token_id else ids for ids in labels]
        out["labels"] = labels
        out["idx"] = list(indices)
        return out

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc="tokenizing")


def pad_pairs(tokenizer, return_tensors: str = "pt") -> DataCollatorForSeq2Seq:
    """`make_loader`'s collator for tokenized pairs: inputs padded as the tokenizer pads, each target's labels
    with -100 (ignored by every loss)."""
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors=return_tensors)

