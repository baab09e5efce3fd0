"""Text-classification data: a Hub dataset or local TSV/CSV/JSON/JSONL/Parquet, tokenized once.

Rows keep an `idx` column (their position in the train split) so cached teacher logits can be
looked up per batch; batches are padded to their own longest row (SST-2 sentences are short).
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from kdlab.distill.config import ConfigError, DataConfig

FORMATS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels", "idx")


@dataclass
class TaskData:
    train: datasets.Dataset
    eval: datasets.Dataset
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_file(path: str, key: str) -> datasets.Dataset:
    """The table at `path` (.tsv .csv .json .jsonl .parquet) as a Dataset; a file that is missing, of another
    format, header-only or not UTF-8 is a one-line ConfigError naming `key` (the dotted config key, e.g.
    data.train_file) and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{key}: unsupported format '{p.suffix}' ({path}); valid: {', '.join(FORMATS)}")
    if fmt == "csv" and not _has_rows(p):
        raise ConfigError(f"{key}: {path} has no rows after its header line; valid: a header, then one row per "
                          f"example")
    kwargs = {}
    if p.suffix.lower() == ".tsv":
        # GLUE TSVs contain bare quote characters inside sentences: read them literally.
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)  # datasets logs a malformed file's traceback itself; ours is one line
    try:
        return datasets.load_dataset(fmt, data_files={"split": str(p)}, split="split", **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files
        cause = exc
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise ConfigError(f"{key}: {path} is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at byte "
                              f"offset {cause.start} of a block); valid: UTF-8 text (convert it, e.g. iconv -f latin1 "
                              f"-t utf-8)") from None
        raise ConfigError(f"{key}: cannot read {path}: {str(exc).splitlines()[0]}") from None
    finally:
        log.setLevel(level)


def _has_rows(path: Path) -> bool:
    """A CSV/TSV with at least one non-blank line after the header (read two lines, not the file)."""
    with open(path, "rb") as fh:
        lines = (line for line in fh if line.strip())
        return next(lines, None) is not None and next(lines, None) is not None


def load_splits(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The train and dev splits as read: local files (train_file/eval_file) or a Hub dataset."""
    if cfg.train_file:
        return load_file(cfg.train_file, "data.train_file"), load_file(cfg.eval_file, "data.eval_file")
    try:
        return (datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.train_split),
                datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.eval_split))
    except Exception as exc:
        raise ConfigError(f"data.dataset: cannot load '{cfg.dataset}': {str(exc).splitlines()[0]}") from None


def subsample(train: datasets.Dataset, dev: datasets.Dataset, cfg: DataConfig,
              seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """data.max_train_samples rows of train (shuffled with the seed) and the first max_eval_samples of dev."""
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(cfg.max_train_samples)).flatten_indices()
    if cfg.max_eval_samples and cfg.max_eval_samples < len(dev):
        dev = dev.select(range(cfg.max_eval_samples))
    return train, dev


def _check_columns(ds: datasets.Dataset, cfg: DataConfig, split: str) -> None:
    where = cfg.train_file if split == "train" else cfg.eval_file
    where = where or f"{cfg.dataset}[{split}]"
    for key in ("text_column", "text_pair_column", "label_column"):
        name = getattr(cfg, key)
        if name is not None and name not in ds.column_names:
            raise ConfigError(f"data.{key}: column '{name}' not in {where}; columns: {', '.join(ds.column_names)}")


def _label_names(train: datasets.Dataset, dev: datasets.Dataset, cfg: DataConfig) -> list[str]:
    feature = train.features[cfg.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    seen = set(train[cfg.label_column])
    values = seen | set(dev[cfg.label_column])
    if None in values:
        raise ConfigError(f"data.label_column: '{cfg.label_column}' has empty labels")
    unseen = values - seen
    if unseen and not cfg.label_names:  # the model could never predict them; with label_names the user said so
        where = cfg.eval_file or f"{cfg.dataset}[{cfg.eval_split}]"
        raise ConfigError(f"data.label_column: {where} has label(s) {sorted(unseen, key=str)[:5]} that never occur in "
                          f"the training rows (labels there: {', '.join(map(str, sorted(seen, key=str)))}); list every "
                          f"class in data.label_names if that is intended")
    if all(isinstance(v, str) for v in values):
        names = cfg.label_names or sorted(values)
        unknown = values - set(names)
        if unknown:
            raise ConfigError(f"data.label_names: labels {sorted(unknown)[:5]} are not in {names}")
        return [str(n) for n in names]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        k = len(cfg.label_names) if cfg.label_names else max(values) + 1
        if min(values) < 0 or max(values) >= k:
            raise ConfigError(f"data.label_column: integer labels must lie in 0..{k - 1}, found {min(values)}..{max(values)}")
        return [str(n) for n in cfg.label_names] if cfg.label_names else [str(i) for i in range(k)]
    raise ConfigError(f"data.label_column: '{cfg.label_column}' must hold integers or class names")


def subset_seed(cfg: DataConfig, train_seed: int) -> int:
    """The seed that picks the labelled subset: data.subset_seed, else the training seed."""
    return train_seed if cfg.subset_seed is None else cfg.subset_seed


def load_task_data(cfg: DataConfig, seed: int = 42) -> TaskData:
    """Read and check both splits; no tokenization yet (that needs the teacher's tokenizer).

    `seed`: the training seed; the labelled subset follows data.subset_seed when that is set.
    """
    train, dev = subsample(*load_splits(cfg), cfg, subset_seed(cfg, seed))
    _check_columns(train, cfg, "train")
    _check_columns(dev, cfg, "eval")
    names = _label_names(train, dev, cfg)
    return TaskData(train=train, eval=dev, label_names=names)


def tokenize(ds: datasets.Dataset, tokenizer, cfg: DataConfig, label_names: list[str]) -> datasets.Dataset:
    """Tokenize (truncated, unpadded) and encode labels; datasets caches the result by fingerprint."""
    to_id = {name: i for i, name in enumerate(label_names)}
    text, pair, label = cfg.text_column, cfg.text_pair_column, cfg.label_column

    def encode(batch, indices):
        first = [str(t) for t in batch[text]]
        second = [str(t) for t in batch[pair]] if pair else None
        out = tokenizer(first, second, truncation=True, max_length=cfg.max_length)
        out["labels"] = [to_id[v] if isinstance(v, str) else int(v) for v in batch[label]]
        out["idx"] = list(indices)
        return out

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names,
                  desc="tokenizing")


def make_loader(ds: datasets.Dataset, tokenizer, batch_size: int, shuffle: bool, seed: int = 42,
                collator=DataCollatorWithPadding) -> DataLoader:
    """Batches of `ds`'s model columns, shuffled by `seed` or in order, padded per batch by `collator(tokenizer)`:
    DataCollatorWithPadding pads the inputs (a label per row); seq2seq passes DataCollatorForSeq2Seq, which also
    pads each target's labels with -100."""
    ds = ds.select_columns([c for c in MODEL_COLUMNS if c in ds.column_names])
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collator(tokenizer, return_tensors="pt"))


def load_test_split(cfg: DataConfig, data: TaskData) -> datasets.Dataset | None:
    """The held-out test split (data.test_file or data.test_split), read as the training rows are and its labels
    encoded as training encoded them; None when the config has none. Read only by the export: the gate, the search
    and the choice never see it. A label the training rows never had is a one-line ConfigError."""
    if not (cfg.test_file or cfg.test_split):
        return None
    if cfg.test_file:
        test, key, where = load_file(cfg.test_file, "data.test_file"), "data.test_file", cfg.test_file
    else:
        key, where = "data.test_split", f"{cfg.dataset}[{cfg.test_split}]"
        try:
            test = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.test_split)
        except Exception as exc:
            raise ConfigError(f"data.test_split: cannot load '{where}': {str(exc).splitlines()[0]}") from None
    for column in filter(None, (cfg.text_column, cfg.text_pair_column, cfg.label_column)):
        if column not in test.column_names:
            raise ConfigError(f"{key}: column '{column}' not in {where}; columns: {', '.join(test.column_names)}")
    return _with_training_labels(test, cfg.label_column, data, key, where)


def _with_training_labels(test: datasets.Dataset, column: str, data: TaskData, key: str,
                          where: str) -> datasets.Dataset:
    """`test` with its labels as `tokenize` encodes the training rows' (class names, or indices 0..k-1 where
    training held integers), so label i means the class the model learnt as i."""
    names, feature, values = data.label_names, test.features[column], test[column]
    if isinstance(feature, datasets.ClassLabel):  # a Hub split: indices into its own names, -1 where unlabelled
        values = [feature.names[v] if v is not None and v >= 0 else None for v in values]
    if any(v is None for v in values):
        raise ConfigError(f"{key}: {where} has rows without a label ('{column}' empty, or -1 as in GLUE's unlabelled "
                          f"test splits); valid: a labelled split of the training classes")
    train_feature = data.train.features[column]
    by_index = isinstance(train_feature, datasets.ClassLabel) or str(getattr(train_feature, "dtype", "")).startswith(
        "int")

    def known(v) -> bool:
        if isinstance(v, str):
            return v in names
        return by_index and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names)

    unseen = sorted({v for v in values if not known(v)}, key=str)
    if unseen:
        raise ConfigError(f"{key}: {where} has label(s) {unseen[:5]} that never occur in the training rows "
                          f"(labels there: {', '.join(names)}); valid: a test split of the same classes")
    if isinstance(feature, datasets.ClassLabel):
        test = test.remove_columns(column).add_column(column, values)
    return test
