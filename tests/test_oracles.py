"""Independent oracles for the export and predict tests, and `parity()` on hand-made logits.

Run: .venv/bin/python -m pytest -q tests/test_oracles.py

The helpers recompute what an export folder serves from its raw parts only: the tokenizer
(`AutoTokenizer.from_pretrained(folder)`), the fp32 weights (`AutoModelForSequenceClassification`),
`torch.ao.quantization.quantize_dynamic` applied as distill/quantize.py documents it, and an
`onnxruntime.InferenceSession` on the served .onnx file. None of them calls kdlab's loading or
prediction code (distill.export.load_served, Served.predict_texts, distill.quantize.apply_recipe), so
the tests that use them would see a wrong label or probability there.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import SST2
from kdlab.distill.export import parity
from kdlab.distill.quantize import Quantized

ONNX_FILES = {"onnx-int8": "model.int8.onnx", "onnx-int8-ffn": "model.int8-ffn.onnx", "onnx-fp32": "model.onnx"}


def sst2_dev(n: int) -> tuple[list[str], list[int]]:
    """The first n rows of the real SST-2 dev file: (sentences, integer labels)."""
    with open(SST2 / "dev.tsv", newline="", encoding="utf-8") as fh:
        rows = [row for _, row in zip(range(n), csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


@contextlib.contextmanager
def one_thread():
    """One torch thread, as kdlab's tests run the served artefact (threads=1); put back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RawServed:
    """The served artefact of an export folder, rebuilt from its raw files without kdlab."""

    def __init__(self, folder: Path, recipe: str):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.folder, self.recipe = Path(folder), recipe
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.fp32 = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        self.session = self.module = None
        if recipe in ONNX_FILES:
            import onnxruntime as ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self.session = ort.InferenceSession(str(self.folder / ONNX_FILES[recipe]), options,
                                                providers=["CPUExecutionProvider"])
        elif recipe == "dynamic-int8":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
                per_channel = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
                self.module = torch.ao.quantization.quantize_dynamic(copy.deepcopy(self.fp32), per_channel,
                                                                     dtype=torch.qint8).eval()
        elif recipe == "fp32":
            self.module = self.fp32
        else:
            raise ValueError(f"no raw oracle for recipe {recipe}")

    def encode(self, texts, pairs=None, max_length: int = 64) -> dict:
        return dict(self.tokenizer(list(texts), list(pairs) if pairs else None, truncation=True,
                                   max_length=max_length, padding=True, return_tensors="pt"))

    def logits(self, enc: dict) -> torch.Tensor:
        if self.session is not None:
            feed = {i.name: enc[i.name].numpy().astype("int64") for i in self.session.get_inputs()}
            return torch.from_numpy(self.session.run(["logits"], feed)[0]).float()
        with torch.inference_mode():
            return self.module(**enc).logits.float()

    def fp32_logits(self, enc: dict) -> torch.Tensor:
        with torch.inference_mode():
            return self.fp32(**enc).logits.float()

    def probs(self, texts, pairs=None, batch: int = 32, max_length: int = 64) -> torch.Tensor:
        """softmax of the served logits, batch by batch (int8 activation scales are per batch)."""
        out = []
        with one_thread():
            for start in range(0, len(texts), batch):
                enc = self.encode(texts[start:start + batch], pairs[start:start + batch] if pairs else None,
                                  max_length)
                out.append(torch.softmax(self.logits(enc), -1))
        return torch.cat(out)


def labels_of(probs: torch.Tensor, names) -> list[str]:
    return [names[i] for i in probs.argmax(-1).tolist()]


def parity_oracle(raw: RawServed, texts, labels, batch: int, max_length: int) -> dict:
    """Served vs fp32 logits over the same batches: rows, max |diff|, label agreement and both accuracies."""
    max_diff, agree, served_right, fp32_right = 0.0, 0, 0, 0
    with one_thread():
        for start in range(0, len(texts), batch):
            enc = raw.encode(texts[start:start + batch], max_length=max_length)
            a, b = raw.logits(enc), raw.fp32_logits(enc)
            y = torch.tensor(labels[start:start + batch])
            max_diff = max(max_diff, (a - b).abs().max().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            served_right += (a.argmax(-1) == y).sum().item()
            fp32_right += (b.argmax(-1) == y).sum().item()
    n = len(texts)
    return {"rows": n, "max_abs_diff": max_diff, "label_agreement": agree / n, "served_quality": served_right / n,
            "reference_quality": fp32_right / n}


# ---------------------------------------------------------------- parity() on hand-made logits


def fixed(recipe: str, outputs: list[torch.Tensor]) -> Quantized:
    """An artefact whose predict(batch) returns outputs[batch['k']]: the logits are known in advance."""
    return Quantized(recipe, "cpu", 0.0, [], lambda batch: outputs[batch["k"]])


def test_parity_counts_label_agreement_and_the_largest_logit_difference():
    served = [torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.5]]), torch.tensor([[-1.0, 4.0]]),
              torch.tensor([[0.0, 0.1], [5.0, 0.0]])]
    reference = [torch.tensor([[0.5, 0.0], [0.0, 1.0], [3.0, 2.0]]), torch.tensor([[2.0, 4.25]]),
                 torch.tensor([[0.2, 0.1], [4.9, 0.1]])]
    # Labels (argmax): batch 0 served 0,1,1 vs reference 0,1,0 (2 agree); batch 1: 1 vs 1; batch 2: 1,0 vs 0,0.
    # |diffs|: batch 0 max 1.5 (3.5 - 2.0); batch 1 max 3.0 (-1 vs 2); batch 2 max 0.2.
    batches = [{"k": 0}, {"k": 1}, {"k": 2}]
    got = parity(fixed("dynamic-int8", served), fixed("fp32", reference), batches)
    assert got == {"rows": 6, "max_abs_diff": pytest.approx(3.0), "label_agreement": pytest.approx(4 / 6)}
    # The largest difference counts wherever it is; agreement is per row, not per batch.
    got = parity(fixed("x", served), fixed("fp32", reference), [batches[2], batches[1], batches[0]])
    assert got["max_abs_diff"] == pytest.approx(3.0) and got["label_agreement"] == pytest.approx(4 / 6)
    got = parity(fixed("x", served[:1]), fixed("fp32", reference[:1]), batches[:1])
    assert got == {"rows": 3, "max_abs_diff": pytest.approx(1.5), "label_agreement": pytest.approx(2 / 3)}


def test_parity_of_identical_artefacts_and_of_reduced_precision_logits():
    logits = [torch.tensor([[0.25, -1.0], [2.0, 2.5]])]
    same = parity(fixed("a", logits), fixed("fp32", [logits[0].clone()]), [{"k": 0}])
    assert same == {"rows": 2, "max_abs_diff": 0.0, "label_agreement": 1.0}
    half = parity(fixed("bf16", [logits[0].to(torch.bfloat16) + 1]), fixed("fp32", logits), [{"k": 0}])
    assert half == {"rows": 2, "max_abs_diff": pytest.approx(1.0), "label_agreement": 1.0}  # compared as float32
    flipped = parity(fixed("a", [logits[0].flip(-1)]), fixed("fp32", logits), [{"k": 0}])
    assert flipped == {"rows": 2, "max_abs_diff": pytest.approx(1.25), "label_agreement": 0.0}
    empty = parity(fixed("a", []), fixed("fp32", []), [])
    assert empty["rows"] == 0 and empty["max_abs_diff"] == 0.0 and math.isnan(empty["label_agreement"])
