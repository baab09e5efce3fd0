"""Seq2seq students, losses, generation metrics, data options and the warm-started teacher, against
hand-computed values and identities."""
import json
import math

import pytest
import torch
from torch import nn
from transformers import (AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration, BertConfig,
                          EncoderDecoderConfig, EncoderDecoderModel, MarianConfig, MBartConfig, MT5Config,
                          PegasusConfig, T5Config, T5ForConditionalGeneration)

from kdlab.distill.adapter import Signals
from kdlab.distill.config import ConfigError
from kdlab.distill.config import DistillConfig
from kdlab.distill.losses import DistillLoss, hidden_states_mse, logit_kd_loss, masked_ce, uniform_hidden_map
from kdlab.distill.seq2seq import (build_seq2seq_student, layer_depths, spread_layer_map,
                                   student_seq2seq_config)
from kdlab.eval.metrics import GENERATION_METRICS, generation_metrics

# --- Losses --------------------------------------------------------------------------------------

def word_kd_loss(student, teacher, labels, temperature):
    """Word-level KD as the seq2seq task computes it: logit KD over the positions that hold a label."""
    return logit_kd_loss(student, teacher, temperature, mask=labels != -100)


def seq2seq_loss(alpha, temperature, hidden_weight, student_depths, teacher_depths, student_width, teacher_width):
    """The one DistillLoss over an encoder-decoder's two stacks."""
    cfg = DistillConfig(alpha=alpha, temperature=temperature, hidden_weight=hidden_weight)
    return DistillLoss(cfg, {"encoder_hidden_states": (student_depths[0], teacher_depths[0]),
                             "hidden_states": (student_depths[1], teacher_depths[1])}, student_width, teacher_width)


# B=2, T=3, V=4; three real targets: (0,0), (0,1), (1,0). Logits are logs of small integers so the
# probabilities are exact fractions.
LABELS = torch.tensor([[1, 2, -100], [3, -100, -100]])
PADDED = LABELS == -100


def _kd_example():
    ln = lambda *xs: [math.log(x) for x in xs]
    teacher = torch.zeros(2, 3, 4)
    student = torch.zeros(2, 3, 4)
    student[0, 0] = torch.tensor(ln(1, 1, 1, 5))   # p_s = (1, 1, 1, 5) / 8, p_t = 1/4 each
    teacher[0, 1] = student[0, 1] = torch.tensor([0.3, -1.0, 2.0, 0.5])  # equal: KL 0
    teacher[1, 0] = torch.tensor(ln(3, 1, 1, 1))   # p_t = (1/2, 1/6, 1/6, 1/6), p_s = 1/4 each
    teacher[PADDED] = torch.randn(3, 4) * 5
    student[PADDED] = torch.randn(3, 4) * 5
    return student, teacher


def test_word_kd_matches_hand_computed_kl_over_real_targets():
    student, teacher = _kd_example()
    kl_00 = 3 * 0.25 * math.log(0.25 / 0.125) + 0.25 * math.log(0.25 / 0.625)
    kl_10 = 0.5 * math.log(0.5 / 0.25) + 3 * (1 / 6) * math.log((1 / 6) / 0.25)
    expected = (kl_00 + 0.0 + kl_10) / 3
    assert word_kd_loss(student, teacher, LABELS, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_word_kd_ignores_padded_positions_and_is_zero_for_equal_logits():
    student, teacher = _kd_example()
    before = word_kd_loss(student, teacher, LABELS, 2.0).item()
    student[PADDED], teacher[PADDED] = torch.randn(3, 4) * 100, torch.randn(3, 4) * 100
    assert word_kd_loss(student, teacher, LABELS, 2.0).item() == pytest.approx(before, rel=1e-6)
    assert word_kd_loss(teacher, teacher.clone(), LABELS, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_word_kd_scales_by_t_squared_and_runs_in_float32():
    student, teacher = _kd_example()
    for temp in (2.0, 4.0):
        assert word_kd_loss(student * temp, teacher * temp, LABELS, temp).item() == pytest.approx(
            temp ** 2 * word_kd_loss(student, teacher, LABELS, 1.0).item(), rel=1e-4)
    half = word_kd_loss(student.bfloat16(), teacher.bfloat16(), LABELS, 1.0)
    assert half.dtype == torch.float32


def test_ce_matches_torch_ignore_index_and_uniform_logits_give_ln_v():
    logits = torch.randn(2, 3, 4)
    expected = nn.functional.cross_entropy(logits.view(-1, 4), LABELS.view(-1), ignore_index=-100)
    assert masked_ce(logits, LABELS).item() == pytest.approx(expected.item(), rel=1e-6)
    assert masked_ce(torch.zeros(2, 3, 4), LABELS).item() == pytest.approx(math.log(4), rel=1e-6)
    assert masked_ce(logits, torch.full((2, 3), -100)).item() == 0.0  # nothing to score, not NaN


def _states():
    # Student: embeddings + 1 layer; teacher: embeddings + 2 layers. B=1, T=2 (token 1 is padding), H=2.
    student = (torch.tensor([[[1.0, 1.0], [9.0, 9.0]]]), torch.tensor([[[2.0, 0.0], [-7.0, 3.0]]]))
    teacher = (torch.zeros(1, 2, 2), torch.randn(1, 2, 2), torch.tensor([[[0.0, 0.0], [5.0, 5.0]]]))
    return student, teacher


def test_hidden_mse_hand_value_over_mapped_pairs_and_real_tokens():
    student, teacher = _states()
    mask = torch.tensor([[1, 0]])
    # pair (0 -> 0): ((1-0)^2 + (1-0)^2) / 2 = 1; pair (1 -> 2): ((2-0)^2 + 0) / 2 = 2; mean 1.5
    assert hidden_states_mse(student, teacher, [0, 2], mask).item() == pytest.approx(1.5)
    doubling = nn.Linear(2, 2, bias=False)
    doubling.weight.data = 2 * torch.eye(2)
    # with W = 2I: (4 + 4) / 2 = 4 and (16 + 0) / 2 = 8; mean 6
    assert hidden_states_mse(student, teacher, [0, 2], mask, doubling).item() == pytest.approx(6.0)
    # one projection per pair, the first left out: (1 + 8) / 2
    assert hidden_states_mse(student, teacher, [0, 2], mask, [None, doubling]).item() == pytest.approx(4.5)


def test_uniform_hidden_map_includes_embeddings_and_last_layer():
    assert uniform_hidden_map(3, 6) == [0, 2, 4, 6]
    assert uniform_hidden_map(2, 6) == [0, 3, 6]
    assert uniform_hidden_map(4, 4) == [0, 1, 2, 3, 4]


def _out(logits, enc, dec, enc_mask=None):
    return Signals(logits=logits, hidden_states=dec, encoder_hidden_states=enc, encoder_mask=enc_mask)


def test_distill_loss_mixes_terms_by_their_weights():
    student, teacher = _kd_example()
    loss_fn = seq2seq_loss(0.3, 2.0, 0.0, (1, 1), (2, 2), 2, 2)
    loss, parts = loss_fn(_out(student, None, None), _out(teacher, None, None), LABELS)
    kd, ce = word_kd_loss(student, teacher, LABELS, 2.0).item(), masked_ce(student, LABELS).item()
    assert parts == pytest.approx({"kd": 0.3 * kd, "ce": 0.7 * ce})
    assert loss.item() == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-6)
    ce_only = seq2seq_loss(0.0, 2.0, 0.0, (1, 1), (2, 2), 2, 2)
    assert not ce_only.needs_teacher and not ce_only.needs_hidden
    assert ce_only(_out(student, None, None), None, LABELS)[0].item() == pytest.approx(ce, rel=1e-6)


def test_distill_loss_hidden_term_averages_stacks_and_masks_decoder_padding_by_labels():
    s_states, t_states = _states()
    labels = torch.tensor([[5, -100]])   # decoder token 1 is padding
    logits = torch.zeros(1, 2, 8)
    loss_fn = seq2seq_loss(0.0, 1.0, 0.5, (1, 1), (2, 2), 2, 2)
    assert loss_fn.needs_teacher and loss_fn.needs_hidden and len(list(loss_fn.parameters())) == 0
    enc_mask = torch.tensor([[1, 1]])
    # encoder over both tokens, map [0, 2]: pair 0 (1 + 81) / 2 = 41, pair 1 (2 + (144 + 4) / 2) / 2 = 38
    enc = (41 + 38) / 2
    _, parts = loss_fn(_out(logits, s_states, s_states, enc_mask), _out(logits, t_states, t_states), labels)
    assert parts["hidden"] == pytest.approx(0.5 * (enc + 1.5) / 2)   # decoder: the hand value above


def test_distill_loss_projects_narrower_students_with_trainable_layers():
    loss_fn = seq2seq_loss(0.5, 2.0, 1.0, (1, 2), (2, 4), 2, 3)
    assert len(loss_fn.projections["encoder_hidden_states"]) == 2 and len(loss_fn.projections["hidden_states"]) == 3
    s_enc = tuple(torch.randn(1, 2, 2) for _ in range(2))
    s_dec = tuple(torch.randn(1, 2, 2) for _ in range(3))
    t_enc = tuple(torch.randn(1, 2, 3) for _ in range(3))
    t_dec = tuple(torch.randn(1, 2, 3) for _ in range(5))
    labels = torch.tensor([[1, 2]])
    loss, _ = loss_fn(_out(torch.randn(1, 2, 5), s_enc, s_dec), _out(torch.randn(1, 2, 5), t_enc, t_dec), labels)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.parameters())


# --- Layer maps and configs ----------------------------------------------------------------------

def test_spread_layer_map_keeps_first_and_last_like_distilbart():
    assert spread_layer_map(2, 6) == [0, 5]
    assert spread_layer_map(3, 6) == [0, 2, 5]
    assert spread_layer_map(4, 6) == [0, 2, 3, 5]
    assert spread_layer_map(6, 6) == [0, 1, 2, 3, 4, 5]
    assert spread_layer_map(6, 12) == [0, 2, 4, 7, 9, 11]   # DistilBART's 12 -> 6 table
    assert spread_layer_map(3, 12) == [0, 6, 11]
    assert spread_layer_map(1, 6) == [0]


def test_spread_layer_map_rejects_impossible_depths_naming_the_key():
    with pytest.raises(ConfigError, match=r"student\.decoder_layers: 7 .*valid: 1\.\.6"):
        spread_layer_map(7, 6, key="student.decoder_layers")
    with pytest.raises(ConfigError, match=r"student\.encoder_layers: 0"):
        spread_layer_map(0, 6, key="student.encoder_layers")


def _t5_config(**kw):
    return T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=4, num_decoder_layers=4, num_heads=2, d_kv=8,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **kw)


def _bert(layers, **kw):
    return BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32, **kw)


def _encoder_decoder_config(enc_layers=3, dec_layers=3):
    cfg = EncoderDecoderConfig.from_encoder_decoder_configs(
        _bert(enc_layers), _bert(dec_layers, is_decoder=True, add_cross_attention=True))
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 0, 3
    return cfg


def _bart_config():
    return BartConfig(vocab_size=64, d_model=16, encoder_layers=3, decoder_layers=2, encoder_ffn_dim=32,
                      decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
                      max_position_embeddings=32)


def test_layer_depths_per_family():
    assert layer_depths(_t5_config()) == (4, 4)
    assert layer_depths(T5Config(num_layers=6, num_decoder_layers=2)) == (6, 2)
    assert layer_depths(_bart_config()) == (3, 2)
    assert layer_depths(_encoder_decoder_config(3, 2)) == (3, 2)
    assert layer_depths(MT5Config(num_layers=8, num_decoder_layers=4)) == (8, 4)
    for config_class in (MarianConfig, MBartConfig, PegasusConfig):
        assert layer_depths(config_class(encoder_layers=5, decoder_layers=1)) == (5, 1)
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        layer_depths(_bert(2))


def test_student_config_sets_depths_and_widths_without_touching_the_teacher():
    teacher = _t5_config()
    cfg = student_seq2seq_config(teacher, 2, 1, d_model=8, num_heads=2)
    assert (cfg.num_layers, cfg.num_decoder_layers, cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (
        2, 1, 8, 2, 4, 32)
    assert (teacher.num_layers, teacher.d_model) == (4, 16)
    bart = student_seq2seq_config(_bart_config(), 1, 1, d_model=8, d_ff=12, num_heads=4)
    assert (bart.encoder_layers, bart.decoder_layers, bart.d_model, bart.encoder_ffn_dim, bart.decoder_ffn_dim,
            bart.encoder_attention_heads, bart.decoder_attention_heads) == (1, 1, 8, 12, 12, 4, 4)
    enc_dec = student_seq2seq_config(_encoder_decoder_config(), 2, 1, d_model=8, d_ff=12)
    for half, layers in ((enc_dec.encoder, 2), (enc_dec.decoder, 1)):
        assert (half.num_hidden_layers, half.hidden_size, half.intermediate_size, half.num_attention_heads) == (
            layers, 8, 12, 2)
    with pytest.raises(ConfigError, match="student.num_heads"):
        student_seq2seq_config(teacher, 2, 1, d_model=10, num_heads=4)


# --- Students ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_teacher():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(_t5_config()).eval()


@pytest.fixture(scope="module")
def enc_dec_teacher():
    torch.manual_seed(0)
    return EncoderDecoderModel(config=_encoder_decoder_config()).eval()


SOURCE = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 11, 1, 0]])
SOURCE_MASK = (SOURCE != 0).long()
DECODER_INPUT = torch.tensor([[0, 12, 13], [0, 14, 15]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=SOURCE, attention_mask=SOURCE_MASK, decoder_input_ids=DECODER_INPUT).logits


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _roundtrip(student, tmp_path):
    student.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(student)
    assert torch.allclose(_logits(loaded), _logits(student.eval()), atol=1e-6)
    return loaded


def test_t5_student_copies_spread_teacher_layers(t5_teacher):
    student = build_seq2seq_student(t5_teacher, 2, 1)
    t, s = t5_teacher.state_dict(), student.state_dict()
    assert (student.config.num_layers, student.config.num_decoder_layers) == (2, 1)
    attn_q = "layer.0.SelfAttention.q.weight"
    assert _same(s[f"decoder.block.0.{attn_q}"], t[f"decoder.block.0.{attn_q}"])
    assert _same(s[f"encoder.block.0.{attn_q}"], t[f"encoder.block.0.{attn_q}"])
    assert _same(s[f"encoder.block.1.{attn_q}"], t[f"encoder.block.3.{attn_q}"])
    ffn_out = "layer.1.DenseReluDense.wo.weight"
    assert _same(s[f"encoder.block.1.{ffn_out}"], t[f"encoder.block.3.{ffn_out}"])
    assert not _same(s[f"encoder.block.1.{attn_q}"], t[f"encoder.block.1.{attn_q}"])
    for name in ("shared.weight", "lm_head.weight", "encoder.final_layer_norm.weight",
                 "decoder.final_layer_norm.weight", "decoder.block.0.layer.1.EncDecAttention.k.weight"):
        assert _same(s[name], t[name]), name
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert _same(s[f"encoder.{bias}"], t[f"encoder.{bias}"]) and _same(s[f"decoder.{bias}"], t[f"decoder.{bias}"])
    # T5 ties the LM head and both embeddings to `shared`; loading must not untie them.
    assert student.lm_head.weight is student.shared.weight is student.encoder.embed_tokens.weight


def test_t5_student_block_0_from_a_higher_teacher_block_takes_block_0_position_bias(t5_teacher):
    student = build_seq2seq_student(t5_teacher, 2, 1, encoder_layer_map=[2, 3], decoder_layer_map=[3])
    t, s = t5_teacher.state_dict(), student.state_dict()
    attn_q, ffn_in = "layer.0.SelfAttention.q.weight", "layer.2.DenseReluDense.wi.weight"
    assert _same(s[f"encoder.block.0.{attn_q}"], t[f"encoder.block.2.{attn_q}"])
    assert _same(s[f"decoder.block.0.{ffn_in}"], t[f"decoder.block.3.{ffn_in}"])
    for stack in ("encoder", "decoder"):
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert _same(s[bias], t[bias])


def test_t5_student_at_full_depth_is_the_teacher(t5_teacher):
    assert torch.equal(_logits(build_seq2seq_student(t5_teacher, 4, 4).eval()), _logits(t5_teacher))


def test_t5_student_generates_and_round_trips(t5_teacher, tmp_path):
    student = build_seq2seq_student(t5_teacher, 2, 1).eval()
    out = student.generate(input_ids=SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and 2 <= out.shape[1] <= 5 and (out[:, 0] == 0).all()
    loaded = _roundtrip(student, tmp_path)
    assert loaded.lm_head.weight is loaded.shared.weight


def test_width_change_needs_random_init(t5_teacher):
    with pytest.raises(ConfigError, match=r"student\.init: teacher-layers needs the teacher's widths \(d_model 16, "
                                          r".*use student\.init=random"):
        build_seq2seq_student(t5_teacher, 2, 1, d_model=8)
    narrow = build_seq2seq_student(t5_teacher, 2, 1, init="random", d_model=8, d_ff=16)
    assert (narrow.config.d_model, narrow.config.d_kv, narrow.lm_head.weight.shape) == (8, 4, (64, 8))
    deep = build_seq2seq_student(t5_teacher, 6, 1, init="random")   # random init may exceed the teacher
    assert deep.config.num_layers == 6


def test_bad_student_specs_name_their_key(t5_teacher):
    with pytest.raises(ConfigError, match=r"student\.init: 'teacher-slice' .*valid: teacher-layers, random"):
        build_seq2seq_student(t5_teacher, 2, 1, init="teacher-slice")
    with pytest.raises(ConfigError, match=r"student\.decoder_layers: 5 .*valid: 1\.\.4"):
        build_seq2seq_student(t5_teacher, 2, 5)
    with pytest.raises(ConfigError, match=r"student\.encoder_layer_map: teacher layers \[4\] .*valid: 0\.\.3"):
        build_seq2seq_student(t5_teacher, 2, 1, encoder_layer_map=[0, 4])
    with pytest.raises(ConfigError, match=r"student\.decoder_layer_map: needs one teacher layer per student "
                                          r"layer \(1\), got 2"):
        build_seq2seq_student(t5_teacher, 2, 1, decoder_layer_map=[0, 1])


def test_encoder_decoder_student_maps_each_stack_separately(enc_dec_teacher, tmp_path):
    student = build_seq2seq_student(enc_dec_teacher, 2, 1, decoder_layer_map=[1])
    assert type(student) is EncoderDecoderModel and layer_depths(student.config) == (2, 1)
    t, s = enc_dec_teacher.state_dict(), student.state_dict()
    q = "attention.self.query.weight"
    assert _same(s[f"encoder.encoder.layer.0.{q}"], t[f"encoder.encoder.layer.0.{q}"])
    assert _same(s[f"encoder.encoder.layer.1.{q}"], t[f"encoder.encoder.layer.2.{q}"])
    assert _same(s[f"decoder.bert.encoder.layer.0.{q}"], t[f"decoder.bert.encoder.layer.1.{q}"])
    cross_k = "crossattention.self.key.weight"
    assert _same(s[f"decoder.bert.encoder.layer.0.{cross_k}"], t[f"decoder.bert.encoder.layer.1.{cross_k}"])
    for name in ("encoder.embeddings.word_embeddings.weight", "encoder.pooler.dense.weight",
                 "decoder.bert.embeddings.position_embeddings.weight",
                 "decoder.cls.predictions.transform.dense.weight"):
        assert _same(s[name], t[name]), name
    assert student.decoder.cls.predictions.decoder.weight is student.decoder.bert.embeddings.word_embeddings.weight
    out = student.eval().generate(input_ids=SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and (out[:, 0] == 2).all()
    _roundtrip(student, tmp_path)


def test_encoder_decoder_student_at_full_depth_is_the_teacher(enc_dec_teacher):
    assert torch.equal(_logits(build_seq2seq_student(enc_dec_teacher, 3, 3).eval()), _logits(enc_dec_teacher))


def test_bart_student_copies_layers_and_full_depth_is_the_teacher():
    torch.manual_seed(0)
    teacher = BartForConditionalGeneration(_bart_config()).eval()
    student = build_seq2seq_student(teacher, 2, 1)
    t, s = teacher.state_dict(), student.state_dict()
    q = "self_attn.q_proj.weight"
    assert _same(s[f"model.encoder.layers.1.{q}"], t[f"model.encoder.layers.2.{q}"])
    assert _same(s[f"model.decoder.layers.0.{q}"], t[f"model.decoder.layers.0.{q}"])
    assert torch.equal(_logits(build_seq2seq_student(teacher, 3, 2).eval()), _logits(teacher))


# --- Generation metrics --------------------------------------------------------------------------

def test_identical_outputs_score_100_everywhere():
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    m = generation_metrics(list(refs), refs)
    assert tuple(m) == GENERATION_METRICS
    assert m == pytest.approx({k: 100.0 for k in GENERATION_METRICS})


def test_exact_match_strips_whitespace_and_counts_half():
    m = generation_metrics(["the cat sat", " a dog \n"], ["the cat sat", "a cat"])
    assert m["exact_match"] == pytest.approx(50.0)
    assert generation_metrics([" a dog \n"], ["a dog"])["exact_match"] == pytest.approx(100.0)


def test_rouge_by_hand_with_stemming():
    # hyp "the cat" vs ref "the cat sat": unigrams P 2/2, R 2/3 -> F1 0.8; bigrams P 1/1, R 1/2 -> F1 2/3;
    # LCS 2 -> as unigrams.
    m = generation_metrics(["the cat"], ["the cat sat"])
    assert (m["rouge1"], m["rouge2"], m["rougeL"]) == pytest.approx((80.0, 200 / 3, 80.0))
    assert generation_metrics(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100.0)  # Porter stems


def test_disjoint_outputs_score_zero_and_bad_inputs_raise():
    m = generation_metrics(["xyz qqq"], ["abc def"])
    assert m["bleu"] == pytest.approx(0.0) and m["chrf"] == pytest.approx(0.0) and m["rouge1"] == 0.0
    with pytest.raises(ValueError):
        generation_metrics([], [])
    with pytest.raises(ValueError):
        generation_metrics(["a"], ["a", "b"])


# --- Data options: source/target columns, nested translation dicts, source prefix ----------------
# README (Seq2seq): "source/target columns of TSV/JSONL (`source_column`, `target_column`; `translation.de` reads
# a dict column of a Hub dataset), with an optional `source_prefix`"; train/seq2seq_data.py.

PAIRS = [("Ein Hund läuft.", "A dog runs."), ("Zwei Männer", "Two men"), ("Ein kleines Mädchen", "A little girl")]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _translation_files(tmp_path):
    """A Hub-style translation dataset as JSONL: an id and one dict column {'de': ..., 'en': ...} per row."""
    rows = [{"id": i, "translation": {"de": de, "en": en}} for i, (de, en) in enumerate(PAIRS)]
    return _jsonl(tmp_path / "train.jsonl", rows), _jsonl(tmp_path / "dev.jsonl", rows[:2])


def test_source_and_target_columns_choose_the_pair_among_other_columns(tmp_path):
    from kdlab.distill.config import DataConfig
    from kdlab.train.seq2seq_data import load_seq2seq_data
    lines = ["id\tde\ten\tnote"] + [f"{i}\t{de}\t{en}\tx{i}" for i, (de, en) in enumerate(PAIRS)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(lines[:2]) + "\n")
    files = {"train_file": str(tmp_path / "train.tsv"), "eval_file": str(tmp_path / "dev.tsv")}
    data = load_seq2seq_data(DataConfig(**files, source_column="de", target_column="en"))
    assert data.train.column_names == ["source", "target"]
    assert list(zip(data.train["source"], data.train["target"])) == PAIRS
    assert list(zip(data.eval["source"], data.eval["target"])) == PAIRS[:1]
    # The other direction is the same file with the two keys swapped.
    reverse = load_seq2seq_data(DataConfig(**files, source_column="en", target_column="de"))
    assert list(zip(reverse.train["source"], reverse.train["target"])) == [(en, de) for de, en in PAIRS]
    with pytest.raises(ConfigError, match=r"data\.source_column: column 'source' not in .*train\.tsv; columns: id, "
                                          r"de, en, note"):
        load_seq2seq_data(DataConfig(**files))  # the defaults, source/target, are not columns of this file


def test_a_seq2seq_test_split_is_a_table_of_the_pair_columns(tmp_path):
    """data.test_file for seq2seq: source/target columns of a table (whatever the training files' form); a plain
    text file cannot hold its target side (there is no test target-file key): one line naming data.test_file."""
    from kdlab.distill.config import DataConfig
    from kdlab.train.seq2seq_data import load_seq2seq_test
    lines = ["id\tde\ten"] + [f"{i}\t{de}\t{en}" for i, (de, en) in enumerate(PAIRS)]
    (tmp_path / "test.tsv").write_text("\n".join(lines) + "\n")
    lined = {"train_file": "train.de", "train_target_file": "train.en", "eval_file": "dev.de",
             "eval_target_file": "dev.en"}
    assert load_seq2seq_test(DataConfig(**lined)) is None
    test = load_seq2seq_test(DataConfig(**lined, test_file=str(tmp_path / "test.tsv"), source_column="de",
                                        target_column="en"))
    assert list(zip(test["source"], test["target"])) == PAIRS
    with pytest.raises(ConfigError) as info:
        load_seq2seq_test(DataConfig(**lined, test_file=str(tmp_path / "test.de")))
    assert str(info.value).startswith(f"data.test_file: {tmp_path / 'test.de'} is not a table; a seq2seq test split "
                                      f"is one file with columns 'source' and 'target'")
    with pytest.raises(ConfigError, match=r"^data\.source_column: column 'source' not in .*test\.tsv"):
        load_seq2seq_test(DataConfig(**lined, test_file=str(tmp_path / "test.tsv")))


def test_a_dotted_column_reads_one_key_of_a_nested_translation_dict(tmp_path):
    from kdlab.distill.config import DataConfig
    from kdlab.train.seq2seq_data import load_seq2seq_data
    train, dev = _translation_files(tmp_path)
    data = load_seq2seq_data(DataConfig(train_file=train, eval_file=dev, source_column="translation.de",
                                        target_column="translation.en"))
    assert list(zip(data.train["source"], data.train["target"])) == PAIRS
    assert list(zip(data.eval["source"], data.eval["target"])) == PAIRS[:2]
    with pytest.raises(ConfigError) as info:
        load_seq2seq_data(DataConfig(train_file=train, eval_file=dev, source_column="translation.fr",
                                     target_column="translation.en"))
    assert str(info.value) == f"data.source_column: column 'translation' of {train} holds no key 'fr'"


def test_source_prefix_goes_before_every_source_and_never_into_the_targets(minilm_dir):
    import datasets
    from transformers import AutoTokenizer

    from kdlab.distill.config import DataConfig
    from kdlab.train.seq2seq_data import tokenize_pairs
    tok = AutoTokenizer.from_pretrained(minilm_dir)  # uncased BERT vocabulary: [CLS] 101, [SEP] 102
    ds = datasets.Dataset.from_dict({"source": [p[0] for p in PAIRS[:2]], "target": [p[1] for p in PAIRS[:2]]})
    prefix = "translate German to English: "
    with_prefix = tokenize_pairs(ds, tok, DataConfig(source_prefix=prefix), decoder_start_token_id=tok.cls_token_id)
    plain = tokenize_pairs(ds, tok, DataConfig(), decoder_start_token_id=tok.cls_token_id)
    assert [tok.decode(r["input_ids"]) for r in with_prefix] == [
        "[CLS] translate german to english : ein hund lauft. [SEP]",
        "[CLS] translate german to english : zwei manner [SEP]"]
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    assert len(prefix_ids) == 5  # translate, german, to, english, ':'
    for p, q in zip(with_prefix, plain):
        assert p["input_ids"] == [101, *prefix_ids, *q["input_ids"][1:]]
        assert p["labels"] == q["labels"]  # the prefix is the source's alone
    # The decoder starts from [CLS]: a target never begins with it, and ends with [SEP].
    assert [tok.decode(r["labels"]) for r in with_prefix] == ["a dog runs. [SEP]", "two men [SEP]"]
    assert [r["idx"] for r in with_prefix] == [0, 1]
    # data.max_length counts the prefix: 8 tokens keep [CLS], the 5 prefix tokens, one source token and [SEP].
    short = tokenize_pairs(ds, tok, DataConfig(source_prefix=prefix, max_length=8), decoder_start_token_id=101)
    assert tok.decode(short[0]["input_ids"]) == "[CLS] translate german to english : ein [SEP]"


def test_config_options_reach_the_prepared_seq2seq_data(tmp_path, tiny_teacher_dir):
    """The four options as YAML keys through train/seq2seq.prepare (what `kdlab distill` runs first)."""
    from accelerate import Accelerator

    from conftest import write_config
    from kdlab.distill.config import load_config
    from kdlab.train.seq2seq import prepare
    train, dev = _translation_files(tmp_path)
    tree = {"name": "s2s", "output_dir": str(tmp_path / "run"), "task": {"type": "seq2seq"},
            "data": {"train_file": train, "eval_file": dev, "source_column": "translation.de",
                     "target_column": "translation.en", "source_prefix": "translate German to English: "},
            "teacher": {"source": tiny_teacher_dir, "encoder_decoder": True}, "tracking": {"enabled": False}}
    prep = prepare(load_config(write_config(tmp_path / "c.yaml", tree)), Accelerator(cpu=True))
    assert list(zip(prep.data.train["source"], prep.data.train["target"])) == PAIRS
    assert [prep.tokenizer.decode(r["input_ids"]) for r in prep.eval_ds] == [
        "[CLS] translate german to english : ein hund lauft. [SEP]",
        "[CLS] translate german to english : zwei manner [SEP]"]
    assert [prep.tokenizer.decode(r["labels"]) for r in prep.eval_ds] == ["a dog runs. [SEP]", "two men [SEP]"]
    assert not (tmp_path / "run").exists()  # prepare writes nothing
    # Without teacher.encoder_decoder the same encoder-only teacher is refused: it cannot generate.
    tree["teacher"]["encoder_decoder"] = False
    with pytest.raises(ConfigError, match=r"is a bert model \(encoder only\) and cannot generate"):
        prepare(load_config(write_config(tmp_path / "c.yaml", tree)), Accelerator(cpu=True))


# --- teacher.encoder_decoder: an encoder-only checkpoint warm-started into both halves ------------


def test_encoder_decoder_teacher_starts_both_halves_from_the_encoder_checkpoint(tiny_teacher_dir):
    from transformers import AutoTokenizer, BertModel

    from kdlab.distill.config import Config
    from kdlab.train.seq2seq import check_teacher_kind, warm_start
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    source = BertModel.from_pretrained(tiny_teacher_dir).state_dict()
    model = warm_start(tiny_teacher_dir, Config(), tok)
    assert isinstance(model, EncoderDecoderModel)
    encoder, decoder = model.encoder.state_dict(), model.decoder.bert.state_dict()
    for name, weight in source.items():
        assert torch.equal(encoder[name], weight), name
        if not name.startswith("pooler."):  # the decoder (BertLMHeadModel) has no pooler
            assert torch.equal(decoder[name], weight), name
    # Only cross-attention (and the LM head's transform) are new: Rothe et al. 2020.
    assert model.config.decoder.is_decoder and model.config.decoder.add_cross_attention
    assert any(".crossattention." in name for name in decoder) and not any(".crossattention." in n for n in source)
    # It decodes with the BERT vocabulary's tokens: starts at [CLS], pads with [PAD], stops at [SEP].
    assert (model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id) == (101, 0, 102)
    assert (model.generation_config.decoder_start_token_id, model.generation_config.eos_token_id) == (101, 102)
    out = model.eval().generate(**tok(["ein hund"], return_tensors="pt", return_token_type_ids=False),
                                max_new_tokens=3, do_sample=False)
    assert out[0, 0].item() == 101 and out.shape[1] <= 4
    # The flag on a model that already generates is refused, naming the key to drop.
    with pytest.raises(ConfigError, match=r"teacher.encoder_decoder: 't5-dir' is already a seq2seq model \(t5\); "
                                          r"drop teacher.encoder_decoder"):
        cfg = Config()
        cfg.teacher.source, cfg.teacher.encoder_decoder = "t5-dir", True
        check_teacher_kind(_t5_config(), cfg)
