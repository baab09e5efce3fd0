"""The transfer set's text side (train/transfer.py): augmentation draws, file reading, the unlabelled complement
of the labelled subset, and the drops that keep dev/test and labelled texts out. No model is loaded.

    .venv/bin/python -m pytest tests/test_transfer.py -q
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from itertools import accumulate

import datasets
import pytest

from kdlab.distill.config import AugmentConfig, ConfigError, DataConfig, TransferConfig
from kdlab.train.data import load_file, subsample
from kdlab.train.transfer import (TransferSet, augment_rows, augment_text, build_transfer_set, corpus_vocab,
                                  normalise, read_texts, unlabelled_rows)

from conftest import SST2

MASK = "[MASK]"
TEXTS = ["a gripping and often funny film", "dull , slow and far too long", "the cast is superb",
         "an utterly charmless mess", "it 's a charming and often affecting journey"]


def aug(**kw) -> AugmentConfig:
    base = {"copies": 1, "mask_prob": 0.0, "replace_prob": 0.0, "ngram_prob": 0.0, "ngram_max": 5, "seed": 0}
    return AugmentConfig(**{**base, **kw})


def draw(text: str, cfg: AugmentConfig, seed: int = 0, corpus: list[str] = TEXTS) -> str:
    vocab, counts = corpus_vocab(corpus)
    return augment_text(text, random.Random(seed), vocab, list(accumulate(counts)), MASK, cfg)


def is_span(part: list, whole: list) -> bool:
    return any(whole[i:i + len(part)] == part for i in range(len(whole) - len(part) + 1))


# ---------------------------------------------------------------- the augmentation draws


def test_normalise_and_corpus_vocab():
    assert normalise("  it 's\ta  film \n") == "it 's a film"
    assert corpus_vocab(["b a", "a c a"]) == (["a", "b", "c"], [3, 1, 1])
    assert corpus_vocab(["a c a", "b a"]) == corpus_vocab(["b a", "a c a"])  # order-free


def test_augmentation_is_deterministic_for_a_seed_and_differs_for_another():
    cfg = aug(copies=3, mask_prob=0.2, replace_prob=0.2, ngram_prob=0.25)
    first = augment_rows(TEXTS, cfg, MASK)
    assert first == augment_rows(TEXTS, cfg, MASK)
    assert first != augment_rows(TEXTS, replace(cfg, seed=1), MASK)
    random.seed(123)  # global random state is not used
    assert first == augment_rows(TEXTS, cfg, MASK)


def test_mask_prob_1_masks_every_word():
    for seed in range(20):
        out = draw(TEXTS[1], aug(mask_prob=1.0), seed)
        assert out.split() == [MASK] * len(TEXTS[1].split())


def test_replace_prob_1_draws_every_word_from_the_corpus_vocabulary():
    vocab = set(corpus_vocab(TEXTS)[0])
    outs = [draw("zzz yyy xxx www vvv uuu", aug(replace_prob=1.0), seed) for seed in range(50)]
    assert all(len(o.split()) == 6 and set(o.split()) <= vocab for o in outs)
    assert len({w for o in outs for w in o.split()}) > 10  # not one word over and over


def test_masking_changes_whole_words_only():
    masked_any = False
    for seed in range(30):
        words = TEXTS[4].split()
        out = draw(TEXTS[4], aug(mask_prob=0.3), seed).split()
        assert len(out) == len(words)
        changed = [i for i, (a, b) in enumerate(zip(words, out)) if a != b]
        assert changed == [i for i, w in enumerate(out) if w == MASK]
        masked_any |= bool(changed)
    assert masked_any


def test_ngram_prob_1_keeps_a_contiguous_span_of_1_to_ngram_max_words():
    words = "one two three four five six seven eight nine ten".split()
    lengths = set()
    for seed in range(200):
        out = draw(" ".join(words), aug(ngram_prob=1.0, ngram_max=4), seed).split()
        assert 1 <= len(out) <= 4 and is_span(out, words)
        lengths.add(len(out))
    assert lengths == {1, 2, 3, 4}
    assert draw("two words", aug(ngram_prob=1.0, ngram_max=5), 3).split() in (["two"], ["words"], ["two", "words"])


def test_an_augmented_copy_is_never_empty():
    cfg = aug(mask_prob=0.3, replace_prob=0.3, ngram_prob=1.0, ngram_max=3)
    assert all(draw(t, cfg, seed) for t in TEXTS + ["x"] for seed in range(50))


def test_replacement_draws_follow_corpus_frequencies():
    corpus = ["a"] * 90 + ["b"] * 10
    assert corpus_vocab(corpus) == (["a", "b"], [90, 10])
    out = draw(" ".join(["w"] * 5000), aug(replace_prob=1.0), seed=7, corpus=corpus).split()
    share_a = out.count("a") / len(out)
    # 5000 draws: the binomial standard deviation is 0.0042, so 0.02 is almost 5 of them (the seed is fixed anyway)
    assert abs(share_a - 0.9) < 0.02
    assert set(out) == {"a", "b"}


def test_copies_are_copies_x_texts_less_the_unchanged_ones():
    cfg = aug(copies=4, mask_prob=0.1, replace_prob=0.1, ngram_prob=0.25, seed=5)
    vocab, counts = corpus_vocab(TEXTS)
    rng = random.Random(cfg.seed)
    every = [(t, augment_text(t, rng, vocab, list(accumulate(counts)), MASK, cfg)) for _ in range(4) for t in TEXTS]
    unchanged = sum(normalise(c) == normalise(t) for t, c in every)
    out = augment_rows(TEXTS, cfg, MASK)
    assert unchanged > 0 and len(out) == 4 * len(TEXTS) - unchanged
    assert out == [c for t, c in every if normalise(c) != normalise(t)]
    fewer = augment_rows(TEXTS, replace(cfg, copies=2), MASK)
    assert fewer == out[:len(fewer)]  # round by round: fewer copies are a prefix
    assert augment_rows(TEXTS, aug(copies=3), MASK) == []  # nothing can change: every copy is left out
    assert len(augment_rows(TEXTS, aug(copies=3, mask_prob=1.0), MASK)) == 3 * len(TEXTS)
    assert augment_rows(TEXTS, aug(copies=0, mask_prob=1.0), MASK) == []


# ---------------------------------------------------------------- reading text files


def test_read_texts_reads_txt_lines_and_a_table_column(tmp_path):
    txt = tmp_path / "more.txt"
    txt.write_text("a fine film\n\n  \nnot good at all\r\ncafé society\n", encoding="utf-8")
    assert read_texts(str(txt), None, "distill.transfer.text_files") == ["a fine film", "not good at all",
                                                                         "café society"]
    tsv = tmp_path / "more.tsv"
    tsv.write_text('text\tid\nhe said "wow" \t1\nsecond one\t2\n', encoding="utf-8")
    assert read_texts(str(tsv), "text", "distill.transfer.text_files") == ['he said "wow" ', "second one"]


def test_read_texts_errors_name_the_key_the_file_and_the_columns(tmp_path):
    tsv = tmp_path / "more.tsv"
    tsv.write_text("sentence\tlabel\ngood\t1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        read_texts(str(tsv), "text", "distill.transfer.text_files")
    assert str(err.value) == f"distill.transfer.text_files: column 'text' not in {tsv}; columns: sentence, label"
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError) as err:
        read_texts(str(missing), None, "distill.transfer.text_files")
    assert str(err.value) == f"distill.transfer.text_files: file not found: {missing}"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^distill.transfer.text_files: .*latin1.txt is not UTF-8"):
        read_texts(str(bad), None, "distill.transfer.text_files")
    other = tmp_path / "more.xml"
    other.write_text("<a/>")
    with pytest.raises(ConfigError, match=r"^distill.transfer.text_files: unsupported format '.xml' .*valid: .txt, "):
        read_texts(str(other), None, "distill.transfer.text_files")


# ---------------------------------------------------------------- the unlabelled rows


def test_unlabelled_rows_are_the_complement_of_the_labelled_subset():
    full = datasets.Dataset.from_dict({"sentence": [f"text {i}" for i in range(50)], "label": [i % 2 for i in range(50)]})
    kept = list(subsample(full, full, DataConfig(max_train_samples=12), seed=3)[0]["sentence"])
    rest = unlabelled_rows(full, 12, 3, "sentence")
    assert len(rest) == 38 and not set(rest) & set(kept)
    assert sorted(rest + kept) == sorted(full["sentence"])
    assert rest != unlabelled_rows(full, 12, 4, "sentence")  # the seed picks the subset
    assert unlabelled_rows(full, None, 3, "sentence") == unlabelled_rows(full, 50, 3, "sentence") == []


def test_unlabelled_rows_need_no_labels_but_the_text_column():
    full = datasets.Dataset.from_dict({"sentence": ["a", "b", "c", "d"], "label": [None] * 4})
    kept = list(subsample(full, full, DataConfig(max_train_samples=1), seed=0)[0]["sentence"])
    assert sorted(unlabelled_rows(full, 1, 0, "sentence") + kept) == ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match=r"^data.text_column: column 'text' not in the train split; columns: "):
        unlabelled_rows(full, 1, 0, "text")


# ---------------------------------------------------------------- the transfer set


def test_build_drops_and_counts_dev_labelled_duplicate_and_empty_texts(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("a new text\nthe   cast is SUPERB\nmore unseen text\n  a new   text \n", encoding="utf-8")
    tcfg = TransferConfig(unlabelled_train=True, text_files=[str(extra)], augment=aug(copies=0))
    unlabelled = ["unseen one", " the  cast is superb ", "dull , slow and far too long", "", "unseen one",
                  "unseen two"]
    tset = build_transfer_set(tcfg, labelled_texts=TEXTS[1:], unlabelled=unlabelled, exclude=["the cast is superb"],
                              mask_token=MASK, text_column_default="sentence")
    assert tset.texts == ["unseen one", "unseen two", "a new text", "the   cast is SUPERB", "more unseen text"]
    assert tset.sources == {"unlabelled_train": 2, "text_files": 3, "augmented": 0}
    assert tset.dropped == {"equals_eval_or_test": 1, "equals_labelled": 1, "duplicate": 2, "empty": 1,
                            "too_short": 0}


def test_min_words_leaves_out_short_unlabelled_and_file_rows_before_the_cap(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("two words\nthree whole words\n", encoding="utf-8")
    unlabelled = ["one", "a b c", "x y", "d e f g", "h i j", "k l m"]
    tcfg = TransferConfig(unlabelled_train=True, max_unlabelled=2, min_words=3, text_files=[str(extra)],
                          augment=aug(copies=1, mask_prob=1.0))
    tset = build_transfer_set(tcfg, labelled_texts=["ok"], unlabelled=unlabelled, exclude=[], mask_token=MASK,
                              text_column_default="sentence")
    # The cap counts kept rows: "one" and "x y" are read and left out, the cap stops before "h i j".
    assert tset.texts[:3] == ["a b c", "d e f g", "three whole words"]
    assert tset.sources["unlabelled_train"] == 2 and tset.sources["text_files"] == 1
    assert tset.dropped["too_short"] == 3  # "one", "x y", "two words"
    # Augmented copies of labelled rows are never filtered by length: "ok" masked is one word, and kept.
    assert tset.texts[3:] == [MASK] and tset.sources["augmented"] == 1


def test_build_caps_unlabelled_and_uses_them_only_when_enabled(tmp_path):
    unlabelled = [f"row {i}" for i in range(10)]
    on = build_transfer_set(TransferConfig(unlabelled_train=True, max_unlabelled=4), [], unlabelled, [], MASK,
                            "sentence")
    assert on.texts == unlabelled[:4] and on.sources["unlabelled_train"] == 4
    off = build_transfer_set(TransferConfig(unlabelled_train=False), [], unlabelled, [], MASK, "sentence")
    assert off.texts == [] and off.digest() == TransferSet([], {}, {}).digest()


def test_build_reads_the_text_column_and_is_deterministic(tmp_path):
    table = tmp_path / "extra.csv"
    table.write_text("review,stars\nloved it,5\nhated it,1\n", encoding="utf-8")
    tcfg = TransferConfig(text_files=[str(table)], text_column="review",
                          augment=aug(copies=2, mask_prob=0.15, replace_prob=0.15, ngram_prob=0.25))
    first = build_transfer_set(tcfg, TEXTS, [], [], MASK, "sentence")
    again = build_transfer_set(tcfg, TEXTS, [], [], MASK, "sentence")
    assert first == again and first.digest() == again.digest() and len(first.digest()) == 64
    assert first.texts[:2] == ["loved it", "hated it"] and first.sources["augmented"] == len(first.texts) - 2
    with pytest.raises(ConfigError, match=r"^distill.transfer.text_files: column 'sentence' not in "):
        build_transfer_set(TransferConfig(text_files=[str(table)]), TEXTS, [], [], MASK, "sentence")


def test_real_sst2_rows_give_a_transfer_set_disjoint_from_labelled_and_dev_texts():
    full = load_file(str(SST2 / "train.tsv"), "data.train_file")
    dev = load_file(str(SST2 / "dev.tsv"), "data.eval_file")
    dev_texts = list(dev["sentence"])
    labelled = list(subsample(full, dev, DataConfig(max_train_samples=200), seed=42)[0]["sentence"])
    rest = unlabelled_rows(full, 200, 42, "sentence")
    assert len(rest) == len(full) - 200
    assert Counter(rest) + Counter(labelled) == Counter(full["sentence"])  # the complement, row for row
    tcfg = TransferConfig(unlabelled_train=True, max_unlabelled=3000,
                          augment=AugmentConfig(copies=3, mask_prob=0.1, replace_prob=0.1, ngram_prob=0.25, seed=0))
    tset = build_transfer_set(tcfg, labelled, rest, dev_texts, MASK, "sentence")
    keys = [normalise(t) for t in tset.texts]
    assert len(keys) == len(set(keys)) and all(keys)
    assert not set(keys) & {normalise(t) for t in dev_texts}
    assert not set(keys) & {normalise(t) for t in labelled}
    assert tset.sources["unlabelled_train"] + tset.dropped["equals_eval_or_test"] <= 3000
    assert tset.sources["augmented"] > 300 and sum(tset.sources.values()) == len(tset.texts)
    # a dev sentence put among the unlabelled rows, with other whitespace, is dropped and counted
    planted = build_transfer_set(replace(tcfg, max_unlabelled=3001), labelled,
                                 ["  " + dev_texts[0].replace(" ", "  ")] + rest, dev_texts, MASK,
                                 "sentence")
    assert planted.dropped["equals_eval_or_test"] == tset.dropped["equals_eval_or_test"] + 1
    assert planted.texts == tset.texts
