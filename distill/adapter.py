"""The one boundary between model outputs and distillation losses.

`run_model` calls any supported model and returns `Signals`: named tensors the losses
understand. Losses never see the architecture; what differs between families (where the
attention value projections live) is kept in this file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

# Value projections per family: BERT/RoBERTa/ELECTRA (`.value`), MPNet (`.attn.v`), DistilBERT (`.v_lin`).
_VALUE_MODULE = re.compile(r"(attention\.self\.value|attention\.attn\.v|attention\.v_lin)$")
# The batch keys a served model takes, whatever the task; the rest of a batch (labels, row ids) is not its input.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Signals:
    logits: torch.Tensor                    # [B, classes]; an encoder-decoder's per target position [B, T, V]
    hidden_states: Optional[tuple] = None   # (embeddings, layer 1, ..., layer L), each [B, T, H]; the decoder's
    attentions: Optional[tuple] = None      # per layer [B, heads, T, T], post-softmax
    values: Optional[list] = field(default=None)  # per layer value projections [B, T, H]
    attention_mask: Optional[torch.Tensor] = None  # real tokens of hidden_states (a decoder's: targets with a label)
    encoder_hidden_states: Optional[tuple] = None  # an encoder-decoder's encoder stack, as hidden_states
    encoder_mask: Optional[torch.Tensor] = None    # real tokens of encoder_hidden_states


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def value_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    found = [m for name, m in model.named_modules() if _VALUE_MODULE.search(name)]
    if not found:
        raise ValueError(f"{type(model).__name__}: no attention value projections found for the "
                         "value-relation loss; use distill.attention_loss=tinybert")
    return found


def run_model(model, batch: dict, *, hidden: bool = False, attentions: bool = False,
              values: bool = False) -> Signals:
    captured: list[torch.Tensor] = []
    hooks = []
    if values:
        hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out))
                 for m in value_modules(model)]
    try:
        out = model(**model_inputs(batch), output_hidden_states=hidden, output_attentions=attentions)
    finally:
        for h in hooks:
            h.remove()
    return Signals(logits=out.logits,
                   hidden_states=out.hidden_states if hidden else None,
                   attentions=out.attentions if attentions else None,
                   values=captured if values else None,
                   attention_mask=batch.get("attention_mask"))


def run_seq2seq(model, batch: dict, decoder_input_ids: torch.Tensor, *, hidden: bool = False) -> Signals:
    """An encoder-decoder read with teacher forcing (`decoder_input_ids`: the labels shifted right): logits per
    target position and, with `hidden`, both stacks' states. Decoder input t is real exactly when label t is,
    so the decoder's mask is `labels != -100`."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=decoder_input_ids, output_hidden_states=hidden)
    return Signals(logits=out.logits, hidden_states=out.decoder_hidden_states, attention_mask=batch["labels"] != -100,
                   encoder_hidden_states=out.encoder_hidden_states, encoder_mask=batch["attention_mask"])
