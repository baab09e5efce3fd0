"""The bad-input sweep: malformed configs, data, teachers, search spaces, exports and prediction inputs.

Each case runs the real `kdlab` command in this process and must end with exit code 2, one line
`kdlab: error: ...` (the last line on stderr: progress bars may come before it) naming what is
wrong, no traceback, and nothing left in the run folder. `docs/errors.md` lists the messages a user
sees (regenerate it with `.venv/bin/python tests/test_bad_input.py`).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import DATA, SST2, build_export, make_tiny_teacher, tiny_run_tree, write_config  # noqa: E402

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


# (id, what, build(tmp, teacher) -> argv, expected fragment of the message)
CASES = [
    # ---- config
    ("truncated-yaml", "a YAML file cut off mid-list",
     lambda t, T: ["distill", "--config", str(_raw(t, "name: x\ndata:\n  train_file: [a, b\n"))], "not valid YAML"),
    ("yaml-not-mapping", "a YAML list instead of a mapping",
     lambda t, T: ["distill", "--config", str(_raw(t, "- a\n- b\n"))], "mapping"),
    ("missing-config", "a config path that does not exist",
     lambda t, T: ["distill", "--config", str(t / "nope.yaml")], "nope.yaml"),
    ("unknown-section", "an unknown top-level key",
     lambda t, T: ["distill", "--config", str(write_config(t / "c.yaml", {**_tree(t, T), "trainer": {}}))],
     "trainer"),
    ("unknown-key", "a misspelt key inside a section",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "train.lerning_rate=1e-4"], "lerning_rate"),
    ("wrong-type", "a word where a number belongs",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "train.batch_size=big"], "train.batch_size"),
    ("negative-lr", "a negative learning rate",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "train.learning_rate=-1"], "train.learning_rate"),
    ("warmup-ratio", "a warm-up ratio above 1",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "train.warmup_ratio=1.5"], "train.warmup_ratio"),
    ("mixed-precision", "an unknown mixed precision",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "train.mixed_precision=fp8"], "mixed_precision"),
    ("bad-override", "an override without '='",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "train.learning_rate"], "train.learning_rate"),
    ("bad-budget", "a relative budget that does not parse",
     lambda t, T: ["gate", "--config", str(_config(t, T)), "target.p95_ms=teacher*fast"], "target.p95_ms"),
    ("unknown-recipe", "a quantization recipe that does not exist",
     lambda t, T: ["gate", "--config", str(_config(t, T)), "quantization.recipes=[int3]"], "int3"),
    # ---- data
    ("missing-train-file", "a training file that does not exist",
     lambda t, T: ["distill", "--config", str(_config(t, T)), f"data.train_file={t}/none.tsv"], "none.tsv"),
    ("missing-text-column", "a text column the file does not have",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "data.text_column=text"], "text_column"),
    ("missing-label-column", "a label column the file does not have",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "data.label_column=y"], "label_column"),
    ("empty-train", "a training file with a header and no rows",
     lambda t, T: ["distill", "--config", str(_with_data(t, T, ROWS[0]))], "no rows"),
    ("unseen-eval-label", "a dev label never seen in training",
     lambda t, T: ["distill", "--config", str(_with_data(t, T, "".join(ROWS), ROWS[0] + "a fine film\t7\n"))], "7"),
    ("non-utf8-data", "a training file that is not UTF-8",
     lambda t, T: ["distill", "--config", str(_with_data(t, T, ("".join(ROWS[:50])).encode() + b"caf\xe9\t1\n"))],
     "UTF-8"),
    # ---- teacher and student
    ("missing-teacher", "a teacher folder that does not exist",
     lambda t, T: ["distill", "--config", str(_config(t, str(t / "no_teacher")))], "folder not found"),
    ("teacher-no-tokenizer", "a teacher folder without tokenizer files",
     lambda t, T: ["distill", "--config", str(_config(t, _teacher_copy(t, T, drop=("tokenizer*", "vocab*",
                                                                                      "special_tokens*"))))],
     "teacher"),
    ("corrupt-safetensors", "a truncated model.safetensors",
     lambda t, T: ["distill", "--config", str(_config(t, _teacher_copy(t, T, corrupt="model.safetensors")))],
     "teacher.source"),
    ("heads-not-dividing", "student heads that do not divide its width",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "student.num_heads=5"], "student.num_heads"),
    ("student-wider-than-teacher", "a teacher-layers student wider than its teacher",
     lambda t, T: ["distill", "--config", str(_config(t, T)), "student.hidden_size=4096"], "student"),
    # ---- search space
    ("space-min-above-max", "a layer range whose min is above its max",
     lambda t, T: ["search", "--config", str(_config(t, T)), "search.num_layers={min: 3, max: 1}"], "num_layers"),
    ("space-no-heads", "no head count divides any searched width",
     lambda t, T: ["search", "--config", str(_config(t, T)), "search.hidden_size=[63]", "search.num_heads=[2,4]"],
     "search"),
    ("space-empty-choices", "an empty list of recipes",
     lambda t, T: ["search", "--config", str(_config(t, T)), "search.recipes=[]"], "search.recipes"),
    ("bad-n-trials", "a trial count of zero",
     lambda t, T: ["search", "--config", str(_config(t, T)), "--n-trials", "0"], "--n-trials"),
    # ---- export
    ("export-nothing", "export with neither a passing gate nor a search",
     lambda t, T: ["export", "--config", str(_config(t, T))], "nothing to export"),
    ("export-bad-pick", "a --pick rule that does not parse",
     lambda t, T: ["export", "--config", str(_config(t, T)), "--pick", "fastest please"], "--pick"),
    ("export-trial-and-pick", "--trial and --pick together",
     lambda t, T: ["export", "--config", str(_config(t, T)), "--trial", "1", "--pick", "max quality"], "--trial"),
    ("export-bad-agreement", "a label-agreement bound above 1",
     lambda t, T: ["export", "--config", str(_config(t, T)), "export.min_label_agreement=1.5"],
     "export.min_label_agreement"),
    # ---- predict
    ("predict-not-export", "a model folder that is not an export",
     lambda t, T: ["predict", "--model", T, "--input", str(SST2 / "dev.tsv"), "--output", str(t / "o.jsonl")],
     "manifest.json"),
    ("predict-missing-column", "an input without the export's text column",
     lambda t, T: ["predict", "--model", str(_export(t, T)), "--input", str(_tsv(t, "text\tlabel\na film\t1\n")),
                   "--output", str(t / "o.jsonl")], "no column 'sentence'"),
    ("predict-unknown-format", "an input file of an unknown format",
     lambda t, T: ["predict", "--model", str(_export(t, T)), "--input", str(_raw(t, "a")), "--output",
                   str(t / "o.jsonl")], "unknown input format"),
    ("seq2seq-line-counts", "seq2seq: source and target files of different line counts",
     lambda t, T: ["distill", "--config", str(_seq2seq(t, T, targets=29))], "has 29 lines but data.train_file"),
    ("seq2seq-empty-line", "seq2seq: an empty source line inside the file",
     lambda t, T: ["distill", "--config", str(_seq2seq(t, T, hole=6))], "empty text at line 7"),
    ("seq2seq-bert-teacher", "seq2seq: an encoder-only (BERT) teacher",
     lambda t, T: ["distill", "--config", str(_seq2seq(t, T))], "cannot generate"),
    ("seq2seq-metric", "seq2seq: a classification metric",
     lambda t, T: ["distill", "--config", str(_seq2seq(t, T, task={"metric": "accuracy"}))],
     "valid: bleu, chrf, rouge1, rouge2, rougeL, exact_match"),
    ("seq2seq-onnx-search", "seq2seq: an ONNX recipe in the search space",
     lambda t, T: ["search", "--config", str(_seq2seq(t, T, teacher={"encoder_decoder": True},
                                                        search={"recipes": ["onnx-int8"]}))],
     "cannot serve seq2seq generation yet"),
    ("predict-missing-input", "an input file that does not exist",
     lambda t, T: ["predict", "--model", str(_export(t, T)), "--input", str(t / "none.tsv"), "--output",
                   str(t / "o.jsonl")], "not found"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, tiny_teacher_dir, capsys):
    from scripts.cli import main as kdlab
    _, _, build, expected = case
    argv = build(tmp_path, tiny_teacher_dir)
    capsys.readouterr()
    code = kdlab(argv)
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert last.startswith("kdlab: error: ") and expected in last, last
    assert "Traceback" not in err
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.rglob("*"))
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.partial").exists()


def write_doc(path: Path) -> None:
    """docs/errors.md: each case and the message a user sees (run this file as a script)."""
    import tempfile

    from scripts.cli import main as kdlab
    teacher_dir = Path(make_tiny_teacher(Path(tempfile.mkdtemp()) / "tiny_teacher"))
    import contextlib
    import io
    lines = ["# What kdlab says to bad input", "",
             "Every case below exits with code 2, prints one line on stderr and leaves no run folder or partial "
             "output (`tests/test_bad_input.py` checks each; regenerate this page with "
             "`.venv/bin/python tests/test_bad_input.py`). Paths are from the test's temporary folder.", "",
             "| case | input | message |", "|---|---|---|"]
    for name, what, build, _ in CASES:
        tmp = Path(tempfile.mkdtemp())
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            kdlab(build(tmp, str(teacher_dir)))
        last = err.getvalue().strip().splitlines()[-1].replace(str(tmp), "<tmp>").replace(str(teacher_dir), "<teacher>")
        lines.append(f"| `{name}` | {what} | `{last.replace('|', '/')}` |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_doc(Path(__file__).resolve().parents[1] / "docs" / "errors.md")
