"""Build a T5 with random weights and a Unigram tokenizer trained on your own text (no Hub needed).

    python scripts/build_t5.py --text ../shared/data/multi30k/train.de ../shared/data/multi30k/train.en \
        --out runs/t5_scratch --vocab-size 8000 --d-model 256 --layers 3

The folder loads with AutoModelForSeq2SeqLM / AutoTokenizer and is a valid `teacher.source` for
task.type=seq2seq (train it with teacher.fine_tune=always). Tests use tiny ones; a from-scratch
T5 needs hours of CPU to translate well, which is why configs/multi30k_t5.yaml warm-starts instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2: pad doubles as the decoder start token


def train_tokenizer(lines, vocab_size: int):
    """A Unigram tokenizer (T5's model family) over `lines`, appending </s> to every sequence."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_t5(out: Path, lines, vocab_size: int = 8000, d_model: int = 256, layers: int = 3, heads: int = 4,
             d_ff: int | None = None, seed: int = 0) -> Path:
    tokenizer = train_tokenizer(lines, vocab_size)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff or 4 * d_model,
                      num_layers=layers, num_decoder_layers=layers, num_heads=heads, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, feed_forward_proj="relu", tie_word_embeddings=True)
    model = T5ForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = 0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", nargs="+", required=True, help="UTF-8 text files, one sentence per line")
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args(argv)
    lines = []
    for path in args.text:
        if not Path(path).is_file():
            print(f"build_t5: error: --text: file not found: {path}", file=sys.stderr)
            return 2
        lines += Path(path).read_text(encoding="utf-8").splitlines()
    build_t5(Path(args.out), lines, args.vocab_size, args.d_model, args.layers, args.heads)
    print(f"T5 ({args.layers}+{args.layers} layers, d_model {args.d_model}) with a {args.vocab_size}-token Unigram "
          f"tokenizer -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
