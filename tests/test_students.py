"""Student shapes, parameter counts and initialisation from the teacher."""
import re

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from distill.config import ConfigError, StudentConfig
from distill.students import build_student, count_params, student_config, uniform_layer_map


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def bert_params(vocab, pos, hidden, layers, ffn, labels):
    """Hand count for BertForSequenceClassification (token types = 2)."""
    emb = (vocab + pos + 2) * hidden + 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden + (hidden * ffn + ffn) + (ffn * hidden + hidden) + 2 * hidden
    pooler = hidden * hidden + hidden
    head = hidden * labels + labels
    return emb + layers * layer + pooler + head


def test_uniform_layer_map_is_top_aligned():
    assert uniform_layer_map(3, 6) == [1, 3, 5]
    assert uniform_layer_map(2, 4) == [1, 3]
    assert uniform_layer_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="exceeds the teacher's 4 layers"):
        uniform_layer_map(5, 4)


def test_teacher_layers_copies_mapped_layers(teacher):
    student = build_student(teacher, StudentConfig(num_layers=2, init="teacher-layers"))
    assert count_params(student) == bert_params(120, 32, 64, 2, 256, 3)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    layer_map = {"0": "1", "1": "3"}  # uniform_layer_map(2, 4)
    for name, tensor in s_sd.items():
        source = re.sub(r"\.layer\.(\d+)\.", lambda m: f".layer.{layer_map[m.group(1)]}.", name)
        assert torch.equal(tensor, t_sd[source]), name
    x = torch.randint(0, 120, (2, 7))
    assert student(input_ids=x).logits.shape == (2, 3)


def test_teacher_slice_takes_teacher_rows_and_reduces_to_copy_at_equal_width(teacher):
    spec = StudentConfig(num_layers=2, hidden_size=32, intermediate_size=64, init="teacher-slice")
    student = build_student(teacher, spec)
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (32, 2, 64)  # head size 16 kept
    assert count_params(student) == bert_params(120, 32, 32, 2, 64, 3)
    t_w = teacher.bert.encoder.layer[1].intermediate.dense.weight
    s_w = student.bert.encoder.layer[0].intermediate.dense.weight
    # every student FFN row is some teacher row restricted to the kept hidden channels
    t_emb, s_emb = teacher.bert.embeddings.word_embeddings.weight, student.bert.embeddings.word_embeddings.weight
    hidden_idx = [next(j for j in range(64) if torch.equal(t_emb[:, j], s_emb[:, i])) for i in range(32)]
    assert hidden_idx == sorted(hidden_idx)
    rows = t_w[:, hidden_idx]
    assert all(any(torch.equal(s_w[i], rows[j]) for j in range(256)) for i in range(64))
    same = build_student(teacher, StudentConfig(num_layers=2, init="teacher-slice"))
    copied = build_student(teacher, StudentConfig(num_layers=2, init="teacher-layers"))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), copied.state_dict().values()))


def test_random_init_differs_from_teacher(teacher):
    student = build_student(teacher, StudentConfig(num_layers=2, init="random"))
    assert not torch.equal(student.bert.encoder.layer[0].attention.self.query.weight,
                           teacher.bert.encoder.layer[1].attention.self.query.weight)


def test_shape_errors_are_config_errors(teacher):
    with pytest.raises(ConfigError, match="needs the teacher's widths"):
        build_student(teacher, StudentConfig(num_layers=2, hidden_size=32, init="teacher-layers"))
    with pytest.raises(ConfigError, match="do not divide hidden_size 48"):
        student_config(teacher.config, StudentConfig(num_layers=2, hidden_size=48, num_heads=5))
    with pytest.raises(ConfigError, match="layers .* do not exist"):
        build_student(teacher, StudentConfig(num_layers=2, layer_map=[0, 9]))
