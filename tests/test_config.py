"""Config loading, overrides and one-line validation errors."""
import subprocess
import sys

import pytest
import yaml

from kdlab.distill.config import ConfigError, load_config, to_dict

BASE = {"name": "x", "data": {"train_file": "a.tsv", "eval_file": "b.tsv"}}


def write(tmp_path, tree):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_defaults_overrides_and_resolved_dict(tmp_path):
    p = write(tmp_path, {**BASE, "train": {"learning_rate": 3e-4}})
    cfg = load_config(p, ["train.learning_rate=1e-5", "student.num_layers=2", "distill.hidden_layer_map=[0,3,6]"])
    assert cfg.train.learning_rate == 1e-5 and cfg.student.num_layers == 2
    assert cfg.distill.hidden_layer_map == [0, 3, 6]
    assert cfg.train.batch_size == 32  # default kept
    resolved = to_dict(cfg)
    assert resolved["output_dir"] == "runs/x" and resolved["train"]["learning_rate"] == 1e-5


@pytest.mark.parametrize("tree,overrides,message", [
    ({**BASE, "trian": {}}, [], "unknown key 'trian'; valid keys: data, distill"),
    (BASE, ["train.lr=1"], "unknown key 'train.lr'; valid keys: batch_size"),
    (BASE, ["train.batch_size=many"], "train.batch_size: expected an integer, got 'many'"),
    (BASE, ["student.hidden_size=256", "student.num_heads=6"], "6 heads do not divide hidden_size 256; valid: 1, 2, 4, 8"),
    (BASE, ["distill.alpha=1.5"], "distill.alpha: must be in [0, 1], got 1.5"),
    (BASE, ["student.init=magic"], "student.init: 'magic'; valid: teacher-layers, teacher-slice, random"),
    ({"name": "x"}, [], "give data.dataset (Hub name) or both data.train_file and data.eval_file"),
    (BASE, ["noequals"], "expected key.sub=value"),
    (BASE, ["train.early_stopping_patience=0"],
     "train.early_stopping_patience: must be >= 1 evaluations, or null for no early stopping; got 0"),
    (BASE, ["train.save_state_every_steps=-5"],
     "train.save_state_every_steps: must be >= 1 steps, or null to save no training state; got -5"),
])
def test_errors_name_file_key_and_valid_values(tmp_path, tree, overrides, message):
    p = write(tmp_path, tree)
    with pytest.raises(ConfigError) as info:
        load_config(p, overrides)
    text = str(info.value)
    assert message in text and "\n" not in text
    if "override" not in text:
        assert str(p) in text


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_training_and_seq2seq_keys_defaults_and_ranges(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    t, d = cfg.train, cfg.data
    # Off unless set: no early stopping, no saved states, one batch per optimizer step.
    assert (t.early_stopping_patience, t.save_state_every_steps, t.grad_accum_steps) == (None, None, 1)
    assert (d.source_column, d.target_column, d.source_prefix, cfg.teacher.encoder_decoder) == (
        "source", "target", "", False)
    seq2seq_keys = ["data.source_column=translation.de", "data.source_prefix='translate German to English: '"]
    dotted = load_config(write(tmp_path, BASE), ["task.type=seq2seq", *seq2seq_keys])
    assert (dotted.data.source_column, dotted.data.source_prefix) == ("translation.de", "translate German to English: ")
    # A classification run reads neither key: setting one would be silently ignored, so it is refused.
    with pytest.raises(ConfigError, match=r"data\.source_column: 'translation\.de' is not used by "
                                          r"task\.type=classification; remove it \(default 'source'\)"):
        load_config(write(tmp_path, BASE), seq2seq_keys)
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps: must be >= 1"):
        load_config(write(tmp_path, BASE), ["train.grad_accum_steps=0"])
    with pytest.raises(ConfigError, match=r"teacher\.encoder_decoder: expected true or false, got 'yes please'"):
        load_config(write(tmp_path, BASE), ["teacher.encoder_decoder=yes please"])


def test_the_config_ladder_is_the_registered_recipes_and_loading_needs_no_torch(tmp_path):
    """distill/config.py names the recipes itself (RECIPE_LADDER) so that checking a config does not import torch;
    the names and their order must be those distill/quantize.py registers."""
    from kdlab.distill.config import RECIPE_LADDER
    from kdlab.distill.quantize import RECIPES
    assert RECIPE_LADDER == RECIPES
    p = write(tmp_path, BASE)
    code = ("import sys; from kdlab.distill.config import load_config; "
            f"cfg = load_config({str(p)!r}); print(cfg.quantization.recipes); "
            "print(sorted(m for m in ('torch', 'kdlab.distill.quantize', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [str(list(RECIPES)), "[]"]
