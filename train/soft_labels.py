"""Teacher soft labels for a list of texts: computed once, cached by teacher weights and texts, resumable.

The student of a distillation may tokenize differently from its teacher (another family, another
vocabulary), and a transfer set may hold ten times the labelled rows. Both are served by one cache:
the teacher's logits for each input *text*, in the order of the texts, under

    <kdlab cache>/teacher_logits/<key>/logits.safetensors   (+ meta.json)

where the key hashes the teacher's weights, the texts (and second texts of pairs), the length limit
and the labelling form asked for. Any change to the teacher or the texts is a new key, so a stale
entry is never read; every trial of a study and every later run with the same teacher and texts
reuses it. Labelling goes in chunks of CHUNK_ROWS rows (sorted by length, so batches carry little
padding), each saved atomically: an interrupted labelling continues at the first missing chunk.

The teacher may label through a faster served form (`onnx-int8`) only after that form's dev labels
are checked against fp32: label agreement >= the configured minimum, with the mean KL divergence
at the training temperature reported beside it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kdlab.distill.adapter import model_inputs
from kdlab.distill.config import ConfigError
from kdlab.distill.quantize import RecipeUnavailable, apply_recipe
from kdlab.eval.latency import cache_dir

CHUNK_ROWS = 4096
FAST_FORM = "onnx-int8"


@dataclass
class LabelReport:
    """How a set of texts was labelled: the form used, its dev check, and the throughput."""
    form: str
    rows: int
    seconds: float
    rows_per_second: float
    reused: bool
    key: str
    check: dict = field(default_factory=dict)  # fast form only: rows, label_agreement, mean_kl, temperature

    def describe(self) -> str:
        if self.form == FAST_FORM and self.check:
            return (f"{self.form} (dev label agreement {self.check['label_agreement']:.2%} with fp32, mean KL "
                    f"{self.check['mean_kl']:.2e} at T={self.check['temperature']:g})")
        return self.form


def texts_digest(texts: list[str], pairs: list[str] | None = None) -> str:
    digest = hashlib.sha256()
    for i, text in enumerate(texts):
        digest.update(text.encode("utf-8"))
        digest.update(b"\x1f" + (pairs[i].encode("utf-8") if pairs is not None else b"") + b"\x1e")
    return digest.hexdigest()


def cache_key(weights: str, texts: list[str], pairs: list[str] | None, max_length: int, form: str) -> str:
    parts = [weights, texts_digest(texts, pairs), str(max_length), form]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def encode(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> dict[str, torch.Tensor]:
    out = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return dict(out)


def length_order(texts: list[str], pairs: list[str] | None) -> list[int]:
    """Row indices sorted by text length (characters: a cheap proxy of tokens), ties by index."""
    size = [len(t) + (len(pairs[i]) if pairs is not None else 0) for i, t in enumerate(texts)]
    return sorted(range(len(texts)), key=lambda i: (size[i], i))


def kl_at(reference: torch.Tensor, other: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(reference / T) || softmax(other / T)) per row."""
    log_p = F.log_softmax(reference.float() / temperature, dim=-1)
    log_q = F.log_softmax(other.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def check_fast_form(fp32_forward, fast_forward, dev_batches: list[dict], temperature: float) -> dict:
    """Label agreement and mean KL of a fast form against fp32 on the dev batches."""
    agree, rows, kl = 0, 0, 0.0
    for batch in dev_batches:
        ref, fast = fp32_forward(batch), fast_forward(batch)
        agree += int((ref.argmax(-1) == fast.argmax(-1)).sum())
        kl += float(kl_at(ref, fast, temperature).sum())
        rows += ref.shape[0]
    return {"rows": rows, "label_agreement": agree / rows, "mean_kl": kl / rows, "temperature": temperature}


def torch_forward(model):
    device = next(model.parameters()).device

    def forward(batch: dict) -> torch.Tensor:
        with torch.inference_mode():
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            return model(**inputs).logits.float().cpu()

    return forward


def choose_form(teacher, form: str, dev_batches: list[dict], *, min_agreement: float, temperature: float,
                workdir: Path, threads: int, say=print):
    """(form used, forward, check): fp32, or the fast form when it passes the dev check.

    `form` auto falls back to fp32 (and says why) when the fast form is unavailable or disagrees;
    `form` onnx-int8 asked for explicitly refuses instead (ConfigError), rather than label with it.
    """
    fp32 = torch_forward(teacher)
    if form == "fp32":
        return "fp32", fp32, {}
    try:
        served = apply_recipe(FAST_FORM, teacher, example_batch=dev_batches[0], device="cpu", workdir=workdir,
                              threads=threads)
    except RecipeUnavailable as exc:
        if form == FAST_FORM:
            raise ConfigError(f"distill.transfer.label_with: {FAST_FORM} is unavailable here ({exc}); valid: auto, "
                              f"fp32") from None
        say(f"teacher labels: {FAST_FORM} unavailable ({exc}); labelling with fp32")
        return "fp32", fp32, {}
    check = check_fast_form(fp32, served.predict, dev_batches, temperature)
    check["min_agreement"] = min_agreement
    passed = check["label_agreement"] >= min_agreement
    say(f"teacher labels: {FAST_FORM} agrees with fp32 on {check['label_agreement']:.2%} of {check['rows']} dev "
        f"labels (needs {min_agreement:.2%}), mean KL {check['mean_kl']:.2e} at T={temperature:g}: "
        + ("labelling with it" if passed else "labelling with fp32"))
    if passed:
        return FAST_FORM, served.predict, check
    if form == FAST_FORM:
        raise ConfigError(f"distill.transfer.label_with: {FAST_FORM} agrees with the fp32 teacher on only "
                          f"{check['label_agreement']:.2%} of dev labels, below distill.transfer.min_agreement "
                          f"{min_agreement:.2%}; valid: auto or fp32 (label with fp32)")
    return "fp32", fp32, check


def _label_entry(entry: Path, texts: list[str], pairs: list[str] | None, tokenizer, forward, *, max_length: int,
                 batch_size: int, bar, meta: dict) -> int:
    """Label one segment into `entry` chunk by chunk (resumable); returns the rows labelled now."""
    order = length_order(texts, pairs)
    chunks = math.ceil(len(order) / CHUNK_ROWS)
    labelled_now = 0
    for c in range(chunks):
        path = entry / f"chunk-{c:05d}.safetensors"
        rows = order[c * CHUNK_ROWS:(c + 1) * CHUNK_ROWS]
        if path.is_file():
            bar.update(len(rows))
            continue
        out = []
        for i in range(0, len(rows), batch_size):
            sel = rows[i:i + batch_size]
            batch = encode(tokenizer, [texts[j] for j in sel],
                           [pairs[j] for j in sel] if pairs is not None else None, max_length)
            out.append(forward(batch))
            bar.update(len(sel))
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"rows": torch.tensor(rows), "logits": torch.cat(out).contiguous()}, str(tmp))
        tmp.rename(path)
        labelled_now += len(rows)
    parts = [load_file(str(entry / f"chunk-{c:05d}.safetensors")) for c in range(chunks)]
    logits = torch.empty(len(texts), parts[0]["logits"].shape[-1])
    for part in parts:
        logits[part["rows"]] = part["logits"]
    final = entry / "logits.safetensors"
    (entry / "meta.json").write_text(json.dumps({**meta, "rows": len(texts)}, indent=2))
    tmp = final.with_suffix(f".{os.getpid()}.tmp")
    save_file({"logits": logits}, str(tmp))
    tmp.rename(final)  # last: an entry with logits always has its meta
    for c in range(chunks):
        (entry / f"chunk-{c:05d}.safetensors").unlink(missing_ok=True)
    return labelled_now


def teacher_soft_labels(teacher, tokenizer, segments: list[list[str]], *, pairs: list | None = None, weights: str,
                        max_length: int, batch_size: int = 64, form: str = "fp32", dev_batches: list[dict] | None = None,
                        min_agreement: float = 0.995, temperature: float = 2.0, threads: int | None = None,
                        root: Path | None = None, say=print, desc: str = "teacher labels"):
    """Logits [rows, num_labels] of the teacher for the texts of `segments`, concatenated in order, and a LabelReport.

    Each segment (the labelled rows; each transfer source) is its own cache entry, so a segment shared by two
    runs (the unlabelled rows, under students that augment with different mask tokens) is labelled once.
    `pairs`: per segment, second texts or None. `weights` is the teacher's weights digest
    (kdlab.train.teacher.weights_digest); `dev_batches` (the teacher's tokens) serve a fast form's check.
    """
    segments = [list(seg) for seg in segments if len(seg)]
    if not segments:
        raise ValueError("no texts to label")
    pairs = pairs or [None] * len(segments)
    root = Path(root or cache_dir() / "teacher_logits")
    keys = [cache_key(weights, seg, p, max_length, form) for seg, p in zip(segments, pairs)]
    entries = [root / k for k in keys]
    missing = [i for i, e in enumerate(entries) if not (e / "logits.safetensors").is_file()]
    rows = sum(len(seg) for seg in segments)
    if not missing:
        meta = json.loads((entries[0] / "meta.json").read_text())
        report = LabelReport(form=meta["form"], rows=rows, seconds=0.0, rows_per_second=0.0, reused=True,
                             key=keys[0], check=meta.get("check") or {})
        say(f"teacher labels: reusing {rows:,} cached rows ({report.describe()}) from {root}")
        return torch.cat([load_file(str(e / "logits.safetensors"))["logits"] for e in entries]), report

    if form != "fp32" and not dev_batches:
        raise ValueError("a fast labelling form needs dev_batches for its check")
    threads = threads or torch.get_num_threads()
    teacher.eval()
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kdlab-label-", dir=root) as work:
        used, forward, check = choose_form(teacher, form, dev_batches or [], min_agreement=min_agreement,
                                           temperature=temperature, workdir=Path(work), threads=threads, say=say)
        labelled_now = 0
        with tqdm(total=sum(len(segments[i]) for i in missing), desc=desc, unit="row", dynamic_ncols=True) as bar:
            for i in missing:
                entries[i].mkdir(parents=True, exist_ok=True)
                labelled_now += _label_entry(entries[i], segments[i], pairs[i], tokenizer, forward,
                                             max_length=max_length, batch_size=batch_size, bar=bar,
                                             meta={"form": used, "check": check})
    seconds = time.perf_counter() - start
    report = LabelReport(form=used, rows=rows, seconds=round(seconds, 2),
                         rows_per_second=round(labelled_now / seconds, 1) if labelled_now else 0.0,
                         reused=False, key=keys[0], check=check)
    say(f"teacher labels: {labelled_now:,} rows with {report.describe()} in {seconds:.0f} s "
        f"({report.rows_per_second:,.0f} rows/s); {rows - labelled_now:,} reused -> {root}")
    return torch.cat([load_file(str(e / "logits.safetensors"))["logits"] for e in entries]), report
