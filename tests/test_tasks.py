"""The task interface and its registry (kdlab.distill.task): built-in tasks, plug-ins, and what they refuse.

    .venv/bin/python -m pytest tests/test_tasks.py -q
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from kdlab.distill import task as registry
from kdlab.distill.config import ConfigError, load_config, quality_scale, save_config
from kdlab.distill.task import REQUIRED_PARTS, load_task, registered, task_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_structure import ROOT, import_graph  # noqa: E402

BASE = {"name": "x", "data": {"train_file": "a.tsv", "eval_file": "b.tsv"}}
SEQ2SEQ = {**BASE, "task": {"type": "seq2seq"}}


def write(tmp_path, tree, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree))
    return p


def plugin(tmp_path, monkeypatch, body: str, module: str = "my_tasks") -> str:
    """A task module outside the repository, importable as `module`."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)  # an earlier test's module of the same name
    load_task.cache_clear()
    return module


@pytest.fixture(autouse=True)
def fresh_registry():
    load_task.cache_clear()
    yield
    load_task.cache_clear()


# ---------------------------------------------------------------- the two built-in tasks


@pytest.mark.parametrize("tree,name,metric,scale", [
    (BASE, "classification", "accuracy", 1.0),
    (SEQ2SEQ, "seq2seq", "bleu", 100.0),
])
def test_each_builtin_task_comes_from_the_registry_with_its_config_facts(tmp_path, tree, name, metric, scale):
    cfg = load_config(write(tmp_path, tree))
    task = task_of(cfg)
    assert task.name == name and cfg.task.metric == metric == task.metrics[0]
    assert quality_scale(cfg) == task.quality_scale == scale
    assert all(hasattr(task, part) for part in REQUIRED_PARTS)
    assert list(registered())[:2] == ["classification", "seq2seq"]


@pytest.mark.parametrize("tree", [BASE, SEQ2SEQ], ids=["classification", "seq2seq"])
def test_a_saved_resolved_config_loads_again_for_either_task(tmp_path, tree):
    """The resolved form holds every section at its default, the ones a task does not read included; the search
    reloads the gate's saved config, so those defaults must not count as settings."""
    cfg = load_config(write(tmp_path, tree))
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.task.type == cfg.task.type and again.task.metric == cfg.task.metric


@pytest.mark.parametrize("tree,override,message", [
    (BASE, "generation.num_beams=4",
     "generation.num_beams: 4 is not used by task.type=classification; remove it (default 1)"),
    (BASE, "distill.seq_kd=only", "distill.seq_kd: 'only' is not used by task.type=classification; remove it "
                                  "(default 'none')"),
    (BASE, "search.decoder_layers=[1,2]", "search.decoder_layers: [1, 2] is not used by task.type=classification"),
    (SEQ2SEQ, "data.label_names=[neg,pos]", "data.label_names: ['neg', 'pos'] is not used by task.type=seq2seq"),
])
def test_a_setting_the_chosen_task_never_reads_is_refused_naming_it(tmp_path, tree, override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, tree), [override])
    assert str(exc.value).startswith(f"{tmp_path}/c.yaml: {message}")
    assert "\n" not in str(exc.value)


def test_an_unknown_task_lists_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"^.*c\.yaml: task\.type: 'ner' is not a registered task; valid: "
                                          r"classification, seq2seq, or a module:Class path$"):
        load_config(write(tmp_path, BASE), ["task.type=ner"])


# ---------------------------------------------------------------- tasks from outside the repository

GOOD = """
from kdlab.distill.task import Task

class PairTask(Task):
    name = "pair"
    metrics = ("f1", "accuracy")
    quality_scale = 1.0
    unused_keys = ("generation",)
    def prepare(self, cfg, accelerator=None): return "prepared"
    def ensure_teacher(self, cfg, accelerator, prep): return None, {}
    def measure(self, cfg, model, prep, threads, recipes, workdir, reference_only=()): return [], {}
    def check_model_folder(self, cfg, path, config): pass
    def prepare_model(self, cfg, model): return "prepared"
    def load_network(self, cfg, model, tokenizer): return None
    def distil(self, cfg, accelerator): return {"steps": 0}
    def search_space(self, cfg): return None
    def search_setup(self, cfg, accelerator, space, console, threads): return None
    def trial_objective(self, trial, ctx): return 0.0, 0.0
    def check_test_split(self, cfg): pass
    def export(self, cfg, choice, dest, console=None): return {}
    def export_summary(self, manifest, dest): return "exported"
    def capacity_unit(self, cfg): return "one pair"
    def serving_latency(self, cfg, models, threads, batch_sizes): return {}
    def load_artefact(self, folder, manifest, tokenizer, *, recipe, device, threads): return None
    def predict_records(self, served, texts, pairs=None): return [{"label": "same"} for _ in texts]
    def check_config(self, cfg, c):
        c(cfg.data.text_pair_column is not None, "data.text_pair_column", "a pair task needs the second column")
"""


def test_a_task_given_as_module_class_in_the_config_loads_and_is_checked(tmp_path, monkeypatch):
    module = plugin(tmp_path, monkeypatch, GOOD)
    tree = {**BASE, "task": {"type": f"{module}:PairTask"}, "data": {**BASE["data"], "text_pair_column": "b"}}
    cfg = load_config(write(tmp_path, tree))
    task = task_of(cfg)
    assert type(task).__name__ == "PairTask" and task.prepare(cfg) == "prepared"
    assert cfg.task.metric == "f1"  # the task's first metric is the default
    with pytest.raises(ConfigError, match=r"task\.metric: 'bleu' for task\.type=my_tasks:PairTask; valid: f1, "
                                          r"accuracy$"):
        load_config(write(tmp_path, tree), ["task.metric=bleu"])
    with pytest.raises(ConfigError, match=r"data\.text_pair_column: a pair task needs the second column$"):
        load_config(write(tmp_path, {**tree, "data": BASE["data"]}))
    with pytest.raises(ConfigError, match=r"generation\.max_new_tokens: 8 is not used by task\.type=my_tasks:PairTask"):
        load_config(write(tmp_path, tree), ["generation.max_new_tokens=8"])


def test_a_task_installed_under_the_entry_point_group_is_registered_by_name(tmp_path, monkeypatch):
    module = plugin(tmp_path, monkeypatch, GOOD)
    point = metadata.EntryPoint(name="pair", value=f"{module}:PairTask", group=registry.ENTRY_POINT_GROUP)
    real = metadata.entry_points
    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda **kw: [point] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw))
    assert registered() == {**registry.BUILTIN, "pair": f"{module}:PairTask"}
    tree = {**BASE, "task": {"type": "pair"}, "data": {**BASE["data"], "text_pair_column": "b"}}
    assert task_of(load_config(write(tmp_path, tree))).name == "pair"
    with pytest.raises(ConfigError, match=r"valid: classification, seq2seq, pair, or a module:Class path$"):
        load_config(write(tmp_path, BASE), ["task.type=ner"])


@pytest.mark.parametrize("body,type_,message", [
    ("class Half:\n    name = 'half'\n    metrics = ('accuracy',)\n", "my_tasks:Half",
     "task 'my_tasks:Half' lacks quality_scale, unused_keys, check_config, check_teacher_fits, prepare, "
     "ensure_teacher, measure, check_model_folder, prepare_model, load_network, distil, search_space, search_setup, "
     "trial_objective, "
     "check_test_split, export, export_summary, capacity_unit, serving_latency, load_artefact, predict_records; valid: a class with "
     "every part of kdlab.distill.task.REQUIRED_PARTS"),
    ("x = 1\n", "my_tasks:Nope", "module 'my_tasks' has no 'Nope' (from 'my_tasks:Nope')"),
    ("x = 1\n", "no_such_pkg.tasks:Ner",
     "cannot import module 'no_such_pkg.tasks' of 'no_such_pkg.tasks:Ner' (ModuleNotFoundError: No module named "
     "'no_such_pkg')"),
    ("raise RuntimeError('boom')\n", "my_tasks:Any", None),
])
def test_a_bad_task_path_or_an_incomplete_task_is_one_line_naming_it(tmp_path, monkeypatch, body, type_, message):
    plugin(tmp_path, monkeypatch, body)
    if message is None:  # a plug-in that raises on import is its bug: the traceback is kept
        with pytest.raises(RuntimeError, match="boom"):
            load_config(write(tmp_path, BASE), [f"task.type={type_}"])
        return
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, BASE), [f"task.type={type_}"])
    assert str(exc.value) == f"{tmp_path}/c.yaml: task.type: {message}"


def test_checking_a_config_of_either_task_loads_no_torch(tmp_path):
    paths = [write(tmp_path, BASE, "a.yaml"), write(tmp_path, SEQ2SEQ, "b.yaml")]
    code = ("import sys; from kdlab.distill.config import load_config; "
            f"print([load_config(p).task.metric for p in {[str(p) for p in paths]!r}]); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["['accuracy', 'bleu']", "[]"]


# ---------------------------------------------------------------- the seam: stages do not know the tasks

# Modules of the stage packages that are a task's own (the built-in tasks' parts, reached from kdlab/tasks/), and
# the registry, which maps task names to implementations. Every other module of those packages is a stage.
TASK_OWNED = ("kdlab.distill.task", "kdlab.distill.students", "kdlab.distill.seq2seq", "kdlab.train.pipeline",
              "kdlab.train.seq2seq", "kdlab.train.seq2seq_data", "kdlab.search.classification_gate",
              "kdlab.search.classification_search", "kdlab.search.classification_export",
              "kdlab.search.seq2seq_gate", "kdlab.search.seq2seq_search", "kdlab.search.seq2seq_export")
STAGE_PACKAGES = ("kdlab.eval", "kdlab.distill", "kdlab.train", "kdlab.search")


def task_names() -> set[str]:
    return set(registry.BUILTIN)


def names_a_task(path: Path) -> list[str]:
    """Every place a module's code (not its docstrings) holds a task's name as a string or reads `is_seq2seq`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in task_names():
                out.append(f"{path.name}:{node.lineno} '{node.value}'")
        elif isinstance(node, ast.Attribute) and node.attr == "is_seq2seq":
            out.append(f"{path.name}:{node.lineno} .is_seq2seq")
    return sorted(out)


def test_no_stage_module_imports_a_task_module():
    graph = import_graph()
    stages = [m for m in graph.values() if m.name.startswith(STAGE_PACKAGES)]
    assert len(stages) > 40
    found = [f"{m.name}:{i.line} imports {i.target}" for m in stages for i in m.imports
             if i.target == "kdlab.tasks" or i.target.startswith("kdlab.tasks.")]
    assert found == []
    tasks = [m for m in graph.values() if m.name.startswith("kdlab.tasks.")]
    assert {m.name for m in tasks} == {"kdlab.tasks.classification", "kdlab.tasks.seq2seq"}


def test_no_stage_module_names_a_task():
    graph = import_graph()
    assert set(TASK_OWNED) <= set(graph)
    # the library's stages, and the entry points users run (benchmarks are scripts about one task, so excluded)
    stages = [name for name in graph if (name.startswith(STAGE_PACKAGES) and name not in TASK_OWNED)
              or name in ("kdlab.api", "kdlab.scripts.cli", "kdlab.scripts.predict", "kdlab.scripts.serve",
                          "kdlab.scripts.serve_app", "kdlab.scripts.loadtest")]
    assert {"kdlab.search.gate", "kdlab.search.capacity", "kdlab.search.objective", "kdlab.distill.losses",
            "kdlab.train.loop"} <= set(stages)
    found = {name: names_a_task(graph[name].path) for name in stages}
    assert found == {name: [] for name in stages}
    # the check is not vacuous: the task-owned modules do name theirs
    assert names_a_task(graph["kdlab.train.seq2seq"].path) and names_a_task(graph["kdlab.distill.task"].path)


def test_the_seam_check_fires_on_a_stage_that_names_a_task(tmp_path):
    stage = tmp_path / "gate.py"
    stage.write_text('"""seq2seq in a docstring is prose."""\n'
                     'def run(cfg, served):\n'
                     '    """Nor here: classification."""\n'
                     '    if cfg.task.type == "seq2seq" or served.is_seq2seq:\n'
                     '        return 1\n')
    assert names_a_task(stage) == ["gate.py:4 'seq2seq'", "gate.py:4 .is_seq2seq"]


def test_the_registry_holds_every_builtin_task_module_of_the_repository():
    on_disk = {p.stem for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"}
    assert {path.split(":")[0].rsplit(".", 1)[1] for path in registry.BUILTIN.values()} == on_disk


def test_an_export_names_its_task_and_one_not_installed_here_is_an_export_error(tmp_path):
    from kdlab.distill.export import ExportError, task_of_export
    assert task_of_export(tmp_path, {"task": {"type": "seq2seq", "metric": "bleu"}}).name == "seq2seq"
    assert task_of_export(tmp_path, {"labels": ["0", "1"]}).name == "classification"  # exports before task.type
    with pytest.raises(ExportError) as exc:
        task_of_export(tmp_path, {"task": {"type": "ner_pkg.tasks:Ner"}})
    assert str(exc.value) == (f"{tmp_path}/manifest.json: task.type: cannot import module 'ner_pkg.tasks' of "
                              f"'ner_pkg.tasks:Ner' (ModuleNotFoundError: No module named 'ner_pkg')")
