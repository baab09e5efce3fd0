"""Student shapes, parameter counts and initialisation from the teacher."""
import re

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdlab.distill.config import ConfigError, StudentConfig
from kdlab.distill.students import build_student, count_params, student_config, uniform_layer_map


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


def test_random_init_copies_nothing_and_follows_the_configs_init():
    """init=random: no tensor comes from the teacher; Linear/Embedding weights ~ N(0, initializer_range), biases 0,
    LayerNorm (1, 0), the padding embedding row 0 (BERT's own initialisation), reproducible from the seed."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=32, num_labels=3, initializer_range=0.1)
    teacher = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a "trained" teacher: no tensor is at its initial value
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    student = build_student(teacher, StudentConfig(num_layers=2, init="random"), seed=7)
    assert student.config.initializer_range == 0.1
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    layer_map = {"0": "1", "1": "3"}
    for name, tensor in s_sd.items():
        if not tensor.is_floating_point():
            continue
        source = re.sub(r"\.layer\.(\d+)\.", lambda m: f".layer.{layer_map[m.group(1)]}.", name)
        assert not torch.equal(tensor, t_sd[source]), f"{name} was copied from the teacher"

    weights = [m.weight for m in student.modules() if isinstance(m, torch.nn.Linear)]
    flat = torch.cat([w.detach().flatten() for w in weights])
    assert flat.std().item() == pytest.approx(0.1, rel=0.03) and abs(flat.mean().item()) < 0.003
    assert all(torch.count_nonzero(m.bias) == 0 for m in student.modules() if isinstance(m, torch.nn.Linear))
    norms = [m for m in student.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 1 + 2 * 2
    assert all(torch.equal(m.weight, torch.ones(64)) and torch.equal(m.bias, torch.zeros(64)) for m in norms)
    emb = student.bert.embeddings.word_embeddings.weight.detach()
    assert torch.count_nonzero(emb[cfg.pad_token_id]) == 0
    rest = torch.cat([emb[1:].flatten(), student.bert.embeddings.position_embeddings.weight.detach().flatten()])
    assert rest.std().item() == pytest.approx(0.1, rel=0.05)
    again = build_student(teacher, StudentConfig(num_layers=2, init="random"), seed=7)
    other = build_student(teacher, StudentConfig(num_layers=2, init="random"), seed=8)
    assert all(torch.equal(a, b) for a, b in zip(s_sd.values(), again.state_dict().values()))
    assert not torch.equal(s_sd["bert.encoder.layer.0.attention.self.query.weight"],
                           other.state_dict()["bert.encoder.layer.0.attention.self.query.weight"])


# ---------------------------------------------------------------- teacher-slice with a known ranking

KEPT_HIDDEN = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(3))[:32].tolist())
# Teacher layer -> heads the slice must keep. Layer 1: head 1 has the largest value rows but near-zero output
# columns, so only the product ||W_v,h|| * ||W_o,h|| ranks it last; layer 3 keeps two others.
HEAD_SCALES = {1: {"v": [3.0, 4.0, 2.0, 1.0], "o": [1.0, 0.1, 2.0, 1.0], "kept": [0, 2]},
               3: {"v": [1.0, 2.0, 0.5, 3.0], "o": [1.0, 2.0, 4.0, 3.0], "kept": [1, 3]}}
KEPT_FFN = {layer: sorted(torch.randperm(256, generator=torch.Generator().manual_seed(10 + layer))[:64].tolist())
            for layer in (1, 3)}


@pytest.fixture(scope="module")
def ranked_teacher():
    """A teacher whose LayerNorm scales, head norms and FFN neuron norms rank a known set first.

    Hidden channels: the embeddings' LayerNorm favours the *other* 32 channels (3 vs 1) and every encoder
    LayerNorm favours KEPT_HIDDEN (|gamma| 2 vs 1, half of them negative), so only the summed |gamma| of all
    nine LayerNorms (17 vs 11) ranks KEPT_HIDDEN first.
    FFN neurons: KEPT_FFN get input rows and output columns x3; a decoy set gets input x20 but output x0.01.
    """
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=32, num_labels=3)
    teacher = BertForSequenceClassification(cfg).eval()
    kept = torch.zeros(64, dtype=torch.bool)
    kept[KEPT_HIDDEN] = True
    sign = torch.ones(64)
    sign[KEPT_HIDDEN[::2]] = -1.0
    with torch.no_grad():
        teacher.bert.embeddings.LayerNorm.weight.copy_(torch.where(kept, 1.0, 3.0))
        for layer in teacher.bert.encoder.layer:
            for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                norm.weight.copy_(torch.where(kept, 2.0 * sign, 1.0))
        for number, scales in HEAD_SCALES.items():
            layer = teacher.bert.encoder.layer[number]
            for h in range(4):
                layer.attention.self.value.weight[h * 16:(h + 1) * 16] *= scales["v"][h]
                layer.attention.output.dense.weight[:, h * 16:(h + 1) * 16] *= scales["o"][h]
        for number, neurons in KEPT_FFN.items():
            layer = teacher.bert.encoder.layer[number]
            decoys = [n for n in range(256) if n not in neurons][:40]
            layer.intermediate.dense.weight[neurons] *= 3.0
            layer.output.dense.weight[:, neurons] *= 3.0
            layer.intermediate.dense.weight[decoys] *= 20.0
            layer.output.dense.weight[:, decoys] *= 0.01
    return teacher


def expected_slice(name: str, t_sd: dict, layer_map: dict) -> torch.Tensor:
    """The teacher tensor a student tensor must equal, from the known index sets (BERT names, by hand)."""
    m = re.search(r"\.layer\.(\d+)\.", name)
    t_layer = layer_map[int(m.group(1))] if m else None
    source = t_sd[re.sub(r"\.layer\.\d+\.", f".layer.{t_layer}.", name) if m else name]
    hid = torch.tensor(KEPT_HIDDEN)
    heads = (torch.tensor([h * 16 + d for h in HEAD_SCALES[t_layer]["kept"] for d in range(16)])
             if t_layer is not None else None)
    ffn = torch.tensor(KEPT_FFN[t_layer]) if t_layer is not None else None

    def rows(x, i):
        return x.index_select(0, i)

    def cols(x, i):
        return x.index_select(1, i)

    if re.search(r"embeddings\.(word|position|token_type)_embeddings\.weight$", name):
        return cols(source, hid)
    if "LayerNorm" in name:
        return rows(source, hid)
    if re.search(r"attention\.self\.(query|key|value)\.weight$", name):
        return cols(rows(source, heads), hid)
    if re.search(r"attention\.self\.(query|key|value)\.bias$", name):
        return rows(source, heads)
    if name.endswith("attention.output.dense.weight"):
        return cols(rows(source, hid), heads)
    if name.endswith("intermediate.dense.weight"):
        return cols(rows(source, ffn), hid)
    if name.endswith("intermediate.dense.bias"):
        return rows(source, ffn)
    if re.search(r"layer\.\d+\.output\.dense\.weight$", name):
        return cols(rows(source, hid), ffn)
    if name.endswith("pooler.dense.weight"):
        return cols(rows(source, hid), hid)
    if name.endswith(("output.dense.bias", "pooler.dense.bias")):
        return rows(source, hid)
    if name == "classifier.weight":
        return cols(source, hid)
    if name == "classifier.bias" or not source.is_floating_point():
        return source
    raise AssertionError(f"no rule for {name}")


def test_teacher_slice_keeps_the_top_ranked_channels_heads_and_neurons(ranked_teacher):
    spec = StudentConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, init="teacher-slice")
    student = build_student(ranked_teacher, spec)
    t_sd, s_sd = ranked_teacher.state_dict(), student.state_dict()
    layer_map = {0: 1, 1: 3}  # uniform_layer_map(2, 4): top-aligned
    for name, tensor in s_sd.items():
        assert torch.equal(tensor, expected_slice(name, t_sd, layer_map)), name
    # The kept channels are those every encoder LayerNorm favours, not those the embeddings' LayerNorm favours.
    assert student.bert.embeddings.LayerNorm.weight.tolist() == [1.0] * 32
    assert student.bert.encoder.layer[0].output.LayerNorm.weight.abs().tolist() == [2.0] * 32


def test_shape_errors_are_config_errors(teacher):
    with pytest.raises(ConfigError, match="needs the teacher's widths"):
        build_student(teacher, StudentConfig(num_layers=2, hidden_size=32, init="teacher-layers"))
    with pytest.raises(ConfigError, match="do not divide hidden_size 48"):
        student_config(teacher.config, StudentConfig(num_layers=2, hidden_size=48, num_heads=5))
    with pytest.raises(ConfigError, match="layers .* do not exist"):
        build_student(teacher, StudentConfig(num_layers=2, layer_map=[0, 9]))


def test_teacher_slice_of_mpnet_keeps_one_head_set_for_its_shared_position_bias():
    # MPNet's relative position bias (buckets x heads) is read by every layer, so a slice keeps the same heads in
    # every layer: here heads 1 and 3, the largest summed importance, though layer 1 alone ranks 0 and 1 first and
    # layer 3 ranks 0 and 3 (importance = value-row norm x output-column norm; value rows scaled per head below).
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    teacher = MPNetForSequenceClassification(MPNetConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=40, num_labels=2)).eval()
    scale = {1: [5.0, 20.0, 1.0, 1.0], 3: [5.0, 1.0, 1.0, 20.0]}  # uniform_layer_map(2, 4) keeps layers 1, 3
    with torch.no_grad():
        for layer, factors in scale.items():
            attn = teacher.mpnet.encoder.layer[layer].attention.attn
            attn.v.weight.mul_(torch.tensor(factors).repeat_interleave(16)[:, None])
            attn.q.bias.copy_(torch.arange(64.0) + 100 * layer)
    spec = StudentConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, init="teacher-slice")
    student = build_student(teacher, spec)

    kept = torch.cat([torch.arange(16, 32), torch.arange(48, 64)])  # heads 1 and 3, 16 wide each
    bias = teacher.mpnet.encoder.relative_attention_bias.weight
    assert torch.equal(student.mpnet.encoder.relative_attention_bias.weight, bias[:, [1, 3]])
    for s_layer, t_layer in enumerate((1, 3)):
        got = student.mpnet.encoder.layer[s_layer].attention.attn.q.bias
        assert torch.equal(got, torch.arange(64.0)[kept] + 100 * t_layer)
    assert student(input_ids=torch.randint(0, 120, (2, 9))).logits.shape == (2, 2)
