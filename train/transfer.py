"""The text side of a distillation transfer set: inputs without gold labels that the teacher labels for logit KD.

Tang et al. 2019, "Distilling task-specific knowledge from BERT into simple neural networks" (arXiv:1903.12136),
sec. 3.3: the student sees far more inputs than the labelled rows when the teacher labels (i) unlabelled rows of
the task, (ii) extra in-domain text and (iii) augmented copies of the labelled rows made by masking words,
replacing words by corpus words drawn by frequency, and sampling n-grams.

    tset = build_transfer_set(cfg.distill.transfer, labelled_texts, unlabelled_rows(full_train, 200, 42, "sentence"),
                              exclude=dev_texts + test_texts, mask_token=tokenizer.mask_token,
                              text_column_default=cfg.data.text_column)
    tset.texts, tset.sources, tset.dropped, tset.digest()

Nothing here reads a label or loads a model; every draw comes from random.Random(augment.seed), so the same
config and inputs give the same texts (and the same digest, the cache key of the teacher's labels).
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import datasets

from kdlab.distill.config import AugmentConfig, ConfigError, TransferConfig
from kdlab.train.data import FORMATS, load_file

TEXT_FILES_KEY = "distill.transfer.text_files"
SOURCES = ("unlabelled_train", "text_files", "augmented")
DROP_REASONS = ("equals_eval_or_test", "equals_labelled", "duplicate", "empty", "too_short")


def normalise(text: str) -> str:
    """`text` with runs of whitespace made one space and the ends stripped: the form equality checks compare."""
    return " ".join(text.split())


def corpus_vocab(texts: list[str]) -> tuple[list[str], list[int]]:
    """The distinct whitespace words of `texts`, sorted (so the order never depends on the input order), and how
    often each occurs: the population and weights of frequency-weighted replacement draws."""
    counts = Counter(word for text in texts for word in text.split())
    vocab = sorted(counts)
    return vocab, [counts[word] for word in vocab]


def augment_text(text: str, rng: random.Random, vocab: list[str], cum_weights: list[int], mask_token: str,
                 cfg: AugmentConfig) -> str:
    """One augmented copy of `text` (Tang et al. 2019, sec. 3.3), its words joined by single spaces.

    Per word one uniform draw u: u < mask_prob gives `mask_token`; u < mask_prob + replace_prob gives a word of
    `vocab` drawn with the cumulative weights `cum_weights` (by corpus frequency); otherwise the word stays. Then,
    with probability ngram_prob, only a contiguous span of n of those words is kept, n uniform in
    1..min(ngram_max, number of words), its start uniform. Masking and replacement act on whole words only and keep
    the word count; at least one word always remains, so a text with a word never becomes empty. A text with no
    word at all is returned unchanged. All draws come from `rng`.
    """
    words = text.split()
    if not words:
        return text
    mask_until = cfg.mask_prob
    replace_until = cfg.mask_prob + cfg.replace_prob
    out = []
    for word in words:
        u = rng.random()
        if u < mask_until:
            out.append(mask_token)
        elif u < replace_until and vocab:
            out.append(rng.choices(vocab, cum_weights=cum_weights)[0])
        else:
            out.append(word)
    if rng.random() < cfg.ngram_prob:
        n = rng.randint(1, min(cfg.ngram_max, len(out)))
        start = rng.randint(0, len(out) - n)
        out = out[start:start + n]
    return " ".join(out)


def augment_pairs(texts: list[str], cfg: AugmentConfig, mask_token: str) -> list[tuple[int, str]]:
    """cfg.copies augmented copies (`augment_text`) of every text as (source index, copy), the vocabulary and its
    frequencies taken from `texts` themselves (a copy that keeps its source's label needs its source).

    Copies are made round by round: round 1 is one copy of each text in order, then round 2, and so on, all from
    one random.Random(cfg.seed); so the result is deterministic for a seed, and the copies of a smaller `copies`
    are a prefix of those of a larger one. A copy whose normalised form equals its source's is left out: a copy
    that changed nothing adds no new input (and is not counted anywhere: it never was a transfer text).
    Copies may still repeat one another or equal another labelled text; `build_transfer_set` drops those.
    """
    if cfg.copies <= 0 or not texts:
        return []
    if cfg.mask_prob > 0 and (not mask_token or len(mask_token.split()) != 1):
        raise ValueError(f"augmentation masks words but the mask token {mask_token!r} is not one word")
    vocab, counts = corpus_vocab(texts)
    cum_weights = list(accumulate(counts))
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.copies):
        for i, text in enumerate(texts):
            copy = augment_text(text, rng, vocab, cum_weights, mask_token, cfg)
            if normalise(copy) != normalise(text):
                out.append((i, copy))
    return out


def augment_rows(texts: list[str], cfg: AugmentConfig, mask_token: str) -> list[str]:
    """cfg.copies augmented copies (`augment_text`) of every text, the vocabulary and its frequencies taken from
    `texts` themselves (see `augment_pairs`, which this returns without the source indices)."""
    return [copy for _, copy in augment_pairs(texts, cfg, mask_token)]


def read_texts(path: str, column: str | None, key: str) -> list[str]:
    """The texts of one file, in file order.

    .txt: one text per line (UTF-8; line ends stripped, blank lines skipped; `column` unused). A table (.tsv .csv
    .json .jsonl .parquet, read as train/data.py reads data files): the values of `column`, an empty value as "".
    A file that is missing, unreadable, not UTF-8 or of another format, and a table without `column`, is a
    one-line ConfigError naming `key` and the file.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    if suffix == ".txt":
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{key}: {path} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at byte offset "
                              f"{exc.start}); valid: UTF-8 text") from None
        return [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if suffix not in FORMATS:
        raise ConfigError(f"{key}: unsupported format '{p.suffix}' ({path}); valid: .txt, {', '.join(FORMATS)}")
    table = load_file(path, key)
    if column not in table.column_names:
        raise ConfigError(f"{key}: column '{column}' not in {path}; columns: {', '.join(table.column_names)}")
    return ["" if value is None else str(value) for value in table[column]]


def unlabelled_rows(full_train: datasets.Dataset, max_train_samples: int | None, seed: int,
                    text_column: str) -> list[str]:
    """The texts of the train rows that `kdlab.train.data.subsample` leaves out of the labelled subset.

    subsample shuffles train with `seed` and keeps the first max_train_samples rows; these are rows
    max_train_samples.. of the same shuffle, so labelled and unlabelled rows together are train exactly once.
    No labelled subset (max_train_samples unset, 0, or >= the row count) leaves nothing. Only `text_column` is
    read: these rows' labels are never looked at. An empty value is "".
    """
    if text_column not in full_train.column_names:
        raise ConfigError(f"data.text_column: column '{text_column}' not in the train split; columns: "
                          f"{', '.join(full_train.column_names)}")
    if not max_train_samples or max_train_samples >= len(full_train):
        return []
    rest = full_train.shuffle(seed=seed).select(range(max_train_samples, len(full_train)))
    return ["" if value is None else str(value) for value in rest[text_column]]


@dataclass
class TransferSet:
    """The transfer texts in order, how many each source gave (after drops), and how many were dropped and why."""
    texts: list[str]
    sources: dict[str, int]  # kept texts per source: unlabelled_train, text_files, augmented
    dropped: dict[str, int]  # equals_eval_or_test, equals_labelled, duplicate, empty, too_short

    def digest(self) -> str:
        """sha256 (hex) of the texts joined by newlines: the texts' part of the teacher-label cache key."""
        return hashlib.sha256("\n".join(self.texts).encode("utf-8")).hexdigest()


def build_transfer_set(tcfg: TransferConfig, labelled_texts: list[str], unlabelled: list[str], exclude: list[str],
                       mask_token: str, text_column_default: str) -> TransferSet:
    """The transfer set of `tcfg`, deterministic for its inputs and tcfg.augment.seed.

    Candidates in order: the first tcfg.max_unlabelled of `unlabelled` that have at least tcfg.min_words words (all
    when unset; none unless tcfg.unlabelled_train), then each of tcfg.text_files in turn (`read_texts`, column
    tcfg.text_column or `text_column_default`; rows under tcfg.min_words words left out too), then
    `augment_rows(labelled_texts)` (copies of labelled rows: never filtered by length). Rows left out by min_words
    count as dropped `too_short`. A candidate is dropped, and counted under the first reason that holds, when its
    normalised form is empty, equals a normalised `exclude` text (dev and test texts: scoring on a text the student
    was taught from would flatter it), equals a labelled text (it already trains with its gold label), or equals
    an earlier kept transfer text. Kept texts are as read.
    """
    excluded = {normalise(t) for t in exclude}
    labelled = {normalise(t) for t in labelled_texts}
    candidates: list[tuple[str, str]] = []
    dropped = dict.fromkeys(DROP_REASONS, 0)

    def long_enough(texts: list[str], cap: int | None = None) -> list[str]:
        """The texts of >= tcfg.min_words words in order, stopping at `cap` kept; the short ones read are counted."""
        kept = []
        for text in texts:
            if cap is not None and len(kept) == cap:
                break
            if len(text.split()) >= tcfg.min_words:
                kept.append(text)
            else:
                dropped["too_short"] += 1
        return kept

    if tcfg.unlabelled_train:
        # The cap counts rows that pass min_words: rows beyond it are never read.
        candidates += [("unlabelled_train", t) for t in long_enough(unlabelled, tcfg.max_unlabelled)]
    column = tcfg.text_column or text_column_default
    for path in tcfg.text_files:
        candidates += [("text_files", t) for t in long_enough(read_texts(path, column, TEXT_FILES_KEY))]
    candidates += [("augmented", t) for t in augment_rows(labelled_texts, tcfg.augment, mask_token)]

    texts, seen = [], set()
    sources = dict.fromkeys(SOURCES, 0)
    for source, text in candidates:
        key = normalise(text)
        reason = ("empty" if not key else "equals_eval_or_test" if key in excluded
                  else "equals_labelled" if key in labelled else "duplicate" if key in seen else None)
        if reason:
            dropped[reason] += 1
            continue
        seen.add(key)
        texts.append(text)
        sources[source] += 1
    return TransferSet(texts=texts, sources=sources, dropped=dropped)
