"""Teacher soft labels per text: equal to a row-by-row forward, cached by weights and texts, resumable."""
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import kdlab.train.soft_labels as soft
from kdlab.train.soft_labels import check_fast_form, teacher_soft_labels, texts_digest
from kdlab.train.teacher import weights_digest

TEXTS = ["a gripping , moving film", "dull", "the plot goes nowhere and the acting is worse",
         "funny", "it 's a charming and often affecting journey", "not bad at all", "a mess", "quietly brilliant",
         "one of the year 's best", "tedious"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir, num_labels=3).eval()
    return model, AutoTokenizer.from_pretrained(tiny_teacher_dir)


def one_by_one(model, tok, texts):
    """The oracle: each text alone, unpadded, through the model."""
    with torch.no_grad():
        return torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])


def label(model, tok, segments, root, **kw):
    return teacher_soft_labels(model, tok, segments, weights=weights_digest(model), max_length=64, batch_size=4,
                               root=root, say=lambda *_: None, **kw)


def test_logits_follow_the_texts_order_and_match_a_row_by_row_forward(teacher, tmp_path):
    model, tok = teacher
    logits, report = label(model, tok, [TEXTS[:6], TEXTS[6:]], tmp_path)
    assert logits.shape == (len(TEXTS), 3)
    torch.testing.assert_close(logits, one_by_one(model, tok, TEXTS), atol=1e-5, rtol=1e-4)
    assert (report.form, report.rows, report.reused) == ("fp32", len(TEXTS), False)
    assert report.rows_per_second > 0


def test_the_cache_is_reused_and_keyed_by_weights_and_texts(teacher, tmp_path, monkeypatch):
    model, tok = teacher
    first, _ = label(model, tok, [TEXTS], tmp_path)
    calls = []
    monkeypatch.setattr(soft, "encode", lambda *a, **k: calls.append(1) or pytest.fail("labelled again"))
    again, report = label(model, tok, [TEXTS], tmp_path)
    assert report.reused and calls == [] and torch.equal(first, again)
    monkeypatch.undo()
    # other texts: a new entry, labelled now
    _, other = label(model, tok, [TEXTS[:-1] + ["tedious beyond words"]], tmp_path)
    assert not other.reused
    # other weights (one bias nudged): a new entry too, never the old logits
    changed = AutoModelForSequenceClassification.from_pretrained(model.name_or_path, num_labels=3).eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.classifier.bias += 1.0
    logits, fresh = label(changed, tok, [TEXTS], tmp_path)
    assert not fresh.reused
    torch.testing.assert_close(logits, first + 1.0, atol=1e-5, rtol=1e-4)
    assert len([p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("kdlab-label")]) == 3


def test_a_shared_segment_is_labelled_once(teacher, tmp_path, monkeypatch):
    model, tok = teacher
    label(model, tok, [TEXTS[:5]], tmp_path)
    rows = []
    real = soft.encode
    monkeypatch.setattr(soft, "encode", lambda tk, texts, pairs, n: rows.extend(texts) or real(tk, texts, pairs, n))
    logits, _ = label(model, tok, [TEXTS[:5], TEXTS[5:]], tmp_path)
    assert sorted(rows) == sorted(TEXTS[5:])
    torch.testing.assert_close(logits, one_by_one(model, tok, TEXTS), atol=1e-5, rtol=1e-4)


def test_an_interrupted_labelling_continues_at_the_first_missing_chunk(teacher, tmp_path, monkeypatch):
    model, tok = teacher
    monkeypatch.setattr(soft, "CHUNK_ROWS", 4)
    real, seen = soft.encode, []

    def dies_in_chunk_two(tk, texts, pairs, n):
        seen.extend(texts)
        if len(seen) > 4:
            raise KeyboardInterrupt
        return real(tk, texts, pairs, n)

    monkeypatch.setattr(soft, "encode", dies_in_chunk_two)
    with pytest.raises(KeyboardInterrupt):
        label(model, tok, [TEXTS], tmp_path)
    entry = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("kdlab-label"))
    assert [p.name for p in entry.glob("chunk-*.safetensors")] == ["chunk-00000.safetensors"]
    assert not (entry / "logits.safetensors").exists()
    relabelled = []
    monkeypatch.setattr(soft, "encode", lambda tk, texts, pairs, n: relabelled.extend(texts) or real(tk, texts, pairs, n))
    logits, _ = label(model, tok, [TEXTS], tmp_path)
    assert len(relabelled) == len(TEXTS) - 4  # the first chunk was not labelled again
    torch.testing.assert_close(logits, one_by_one(model, tok, TEXTS), atol=1e-5, rtol=1e-4)
    assert list(entry.glob("chunk-*")) == []


def test_fast_form_check_counts_agreement_and_kl():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]])
    flipped = ref.clone()
    flipped[3] = torch.tensor([0.0, 0.5])
    same = check_fast_form(lambda b: ref, lambda b: ref, [{}], 2.0)
    assert same["label_agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-7)
    half = check_fast_form(lambda b: ref, lambda b: flipped, [{}], 2.0)
    p, q = torch.softmax(torch.tensor([0.25, 0.0]), -1), torch.softmax(torch.tensor([0.0, 0.25]), -1)
    assert half["label_agreement"] == 0.75
    assert half["mean_kl"] == pytest.approx(float((p * (p / q).log()).sum()) / 4, rel=1e-5)


def test_texts_digest_separates_pairs_from_concatenation():
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])
    assert texts_digest(["a"], ["b"]) != texts_digest(["a b"])
