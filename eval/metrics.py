"""Task metrics (scikit-learn; sacrebleu and rouge-score for generation): one definition shared by
training, the gate and the search."""
from __future__ import annotations

import sacrebleu
from sklearn.metrics import accuracy_score, f1_score


def classification_metrics(labels, preds, num_labels: int) -> dict:
    """Accuracy and F1 (binary for two labels, macro-averaged over classes otherwise)."""
    return {"accuracy": float(accuracy_score(labels, preds)),
            "f1": float(f1_score(labels, preds, average="binary" if num_labels == 2 else "macro",
                                 zero_division=0))}


GENERATION_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match")


def generation_metrics(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu), mean ROUGE-1/2/L F1 (rouge-score, Porter stemmer), exact match.

    All on sacrebleu's 0-100 scale: ROUGE F1 and exact match (share of hypotheses equal to their
    reference after stripping surrounding whitespace) are multiplied by 100.
    """
    if not hypotheses or len(hypotheses) != len(references):
        raise ValueError(f"generation_metrics needs as many hypotheses as references, at least one; "
                         f"got {len(hypotheses)} and {len(references)}")
    # Imported here: rouge-score pulls in nltk (over a second), which classification runs never need.
    from rouge_score.rouge_scorer import RougeScorer
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    rouge = {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references))
    return {"bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
            "chrf": float(sacrebleu.corpus_chrf(hypotheses, [references]).score),
            **{k: float(v) for k, v in rouge.items()},
            "exact_match": 100.0 * exact / len(hypotheses)}
