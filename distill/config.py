"""One typed config per run: the schema (dataclasses with help text), its checks, and `load_config`.

    cfg = load_config("configs/smoke.yaml", ["train.learning_rate=1e-4", "student.num_layers=2"])

Every field carries help text; unknown keys and wrong types are `ConfigError`s that name the
file and the dotted key (the loader: distill/config_load.py), and every section's range checks run
when the config is loaded (`validate`, below). The budget and search-range grammars are
distill/grammar.py. `to_dict(cfg)` gives the resolved form that is saved in the run folder and
logged to MLflow.

The names callers use are all importable from here: `from kdlab.distill.config import Config,
ConfigError, load_config, save_config, to_dict, flatten, redact, Range, parse_budget, ...`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kdlab.distill.config_load import build, read_tree
# Re-exported: the loader's and the grammar's names are part of the config's interface.
from kdlab.distill.config_load import flatten, redact, save_config, to_dict  # noqa: F401
from kdlab.distill.errors import ConfigError
from kdlab.distill.grammar import Range, parse_budget, parse_range  # noqa: F401
from kdlab.distill.task import DEFAULT_TASK, check_unused, load_task, task_of


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TaskConfig:
    type: str = _f(DEFAULT_TASK, "classification (sequence classifiers), seq2seq (T5, BART, encoder-decoder), "
                                     "a task installed under the kdlab.tasks entry points, or module:Class "
                                     "(kdlab.distill.task)")
    metric: Optional[str] = _f(None, "dev metric used for early stopping and selection: accuracy or f1 "
                                     "(classification; default accuracy); bleu, chrf, rouge1, rouge2, rougeL or "
                                     "exact_match (seq2seq; default bleu); a task's first metric by default")

    def __post_init__(self):
        if self.metric is None:
            try:
                self.metric = load_task(self.type).metrics[0]
            except ConfigError:
                pass  # an unknown task.type: validate names it with the file


@dataclass
class DataConfig:
    dataset: Optional[str] = _f(None, "Hub dataset name (e.g. glue); use instead of train_file/eval_file")
    dataset_config: Optional[str] = _f(None, "Hub dataset configuration (e.g. sst2)")
    train_split: str = _f("train", "split of the Hub dataset used for training")
    eval_split: str = _f("validation", "split of the Hub dataset used for evaluation")
    train_file: Optional[str] = _f(None, "local train file: .tsv .csv .json .jsonl .parquet")
    eval_file: Optional[str] = _f(None, "local dev file, same format as train_file")
    text_column: str = _f("sentence", "column holding the text (first sentence of a pair)")
    text_pair_column: Optional[str] = _f(None, "second sentence column for sentence-pair tasks")
    label_column: str = _f("label", "column holding the label: integers 0..K-1 or names")
    label_names: Optional[list] = _f(None, "class names in label-id order; inferred when omitted")
    max_train_samples: Optional[int] = _f(None, "use only the first N train rows (after shuffling with subset_seed)")
    subset_seed: Optional[int] = _f(None, "seed of the shuffle that picks max_train_samples rows; default train.seed "
                                          "(set it to vary the training seed over one fixed labelled subset)")
    max_eval_samples: Optional[int] = _f(None, "use only the first N dev rows")
    max_length: int = _f(128, "truncate inputs to this many tokens; batches are padded per batch")
    source_column: str = _f("source", "seq2seq: column holding the source text (a.b reads key b of a dict column, "
                                      "e.g. translation.de)")
    target_column: str = _f("target", "seq2seq: column holding the target text")
    train_target_file: Optional[str] = _f(None, "seq2seq: target side of line-aligned plain-text pairs; train_file is "
                                                "then the source side (line N pairs with line N)")
    eval_target_file: Optional[str] = _f(None, "seq2seq: target side of the dev pairs, line-aligned with eval_file")
    source_prefix: str = _f("", "seq2seq: text put before every source, e.g. 'translate German to English: ' (T5)")
    max_target_length: int = _f(128, "seq2seq: truncate targets to this many tokens")
    test_file: Optional[str] = _f(None, "held-out labelled test file, same format as train_file: scored once, for the "
                                        "exported model only (card, manifest, MLflow); never read by the gate, the "
                                        "search or the choice")
    test_split: Optional[str] = _f(None, "held-out split of the Hub dataset (data.dataset), used as data.test_file is")


@dataclass
class TeacherConfig:
    source: str = _f("minilm-l6", "Hub id, local folder, or a named offline teacher (minilm-l6)")
    fine_tune: str = _f("auto", "auto (when the model has no head for this task), always, never")
    num_epochs: float = _f(2.0, "fine-tuning epochs")
    learning_rate: float = _f(5e-5, "fine-tuning peak learning rate")
    trust_remote_code: bool = _f(False, "allow custom model code from the Hub (off unless you trust the repo)")
    encoder_decoder: bool = _f(False, "seq2seq: build the teacher as an encoder-decoder warm-started from "
                                      "teacher.source, an encoder-only model (BERT, MiniLM), for both halves "
                                      "(Rothe et al. 2020); cross-attention starts random and is learned by fine-tuning")
    allow_pickle: bool = _f(False, "load a teacher that has only pickle weights (pytorch_model.bin); unpickling "
                                   "can run code, so only for checkpoints you trust")


@dataclass
class StudentConfig:
    num_layers: int = _f(3, "transformer layers")
    hidden_size: Optional[int] = _f(None, "width; default the teacher's")
    num_heads: Optional[int] = _f(None, "attention heads; must divide hidden_size; default keeps the teacher's head size")
    intermediate_size: Optional[int] = _f(None, "FFN width; default 4 x hidden_size")
    init: str = _f("teacher-layers", "teacher-layers (copy, widths must match), teacher-slice (narrower), random")
    layer_map: Optional[list] = _f(None, "teacher layer index copied into each student layer; default uniform")
    pretrained: Optional[str] = _f(None, "build the student from this pretrained model (a folder, a Hub id, or a named "
                                         "family: minilm-l6) instead of the teacher: its own tokenizer, its layers "
                                         "chosen by num_layers/layer_map as for the teacher (init teacher-layers or "
                                         "teacher-slice then refer to this model)")
    encoder_layers: Optional[int] = _f(None, "seq2seq: encoder layers; default the teacher's")
    decoder_layers: Optional[int] = _f(None, "seq2seq: decoder layers; default student.num_layers")
    encoder_layer_map: Optional[list] = _f(None, "seq2seq: teacher encoder layer copied into each student one; "
                                                 "default spread out, first and last kept (DistilBART)")
    decoder_layer_map: Optional[list] = _f(None, "seq2seq: teacher decoder layer copied into each student one")


@dataclass
class AugmentConfig:
    """Augmented copies of the labelled rows (Tang et al. 2019): per word, mask it (the student's mask
    token) with mask_prob, else replace it by a word drawn from the corpus's own vocabulary with
    replace_prob; then, with ngram_prob, keep only an n-gram (n in 1..ngram_max) of the result."""
    copies: int = _f(0, "augmented copies per labelled row (0: none)")
    mask_prob: float = _f(0.1, "per-word probability of the mask token")
    replace_prob: float = _f(0.1, "per-word probability of a random corpus word (by frequency)")
    ngram_prob: float = _f(0.25, "per-copy probability of keeping only an n-gram")
    ngram_max: int = _f(5, "longest n-gram kept")
    seed: int = _f(0, "seed of the augmentation draws")


@dataclass
class TransferConfig:
    """The transfer set: inputs without gold labels that the teacher labels (once, cached) for logit KD.
    Labelled rows train on KD + CE, transfer rows on KD alone; texts equal to a dev or test text are dropped."""
    unlabelled_train: bool = _f(False, "the train file's rows outside the labelled subset (data.max_train_samples), "
                                       "their labels unread")
    max_unlabelled: Optional[int] = _f(None, "use at most this many of those rows (after min_words)")
    min_words: int = _f(0, "leave out unlabelled and text_files rows of fewer words (whitespace-separated): short "
                           "fragments (most SST-2 train rows are phrases of a few words) teach less per step than "
                           "texts as long as the ones served; 0 keeps all")
    text_files: list = _f([], "more text: .txt (one text per line) or a table (.tsv .csv .json .jsonl .parquet) "
                              "with text_column")
    text_column: Optional[str] = _f(None, "column of text_files tables holding the text; default data.text_column")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    label_with: str = _f("auto", "how the teacher labels the set: fp32; onnx-int8 (faster, used only when its dev "
                                 "labels agree with fp32 on >= min_agreement, else refused); auto (onnx-int8 when "
                                 "it passes that check, else fp32)")
    min_agreement: float = _f(0.995, "dev label agreement the fast labelling form needs with fp32")
    batch_size: int = _f(64, "texts per labelling batch (sorted by length, so padding is small)")

    @property
    def enabled(self) -> bool:
        return self.unlabelled_train or bool(self.text_files) or self.augment.copies > 0


@dataclass
class DistillConfig:
    temperature: float = _f(2.0, "softmax temperature T of logit KD")
    alpha: float = _f(0.5, "weight of logit KD; (1 - alpha) weights hard-label cross-entropy")
    hidden_weight: float = _f(0.0, "weight of hidden-state MSE (0 disables)")
    hidden_layer_map: Optional[list] = _f(None, "teacher hidden-state index matched by each student one; default uniform")
    attention_weight: float = _f(0.0, "weight of attention KD (0 disables)")
    attention_loss: str = _f("minilm", "tinybert (attention-map MSE) or minilm (value-relation KL)")
    relation_heads: int = _f(4, "relation heads of the MiniLM value-relation loss")
    seq_kd: str = _f("none", "seq2seq sequence-level KD (Kim & Rush 2016): none; only (train on the teacher's "
                             "beam-search outputs instead of the references); mix (both)")
    seq_kd_num_beams: int = _f(4, "beam size of the teacher outputs used for sequence-level KD (generated once, cached)")
    cache_teacher_logits: bool = _f(True, "compute teacher logits once and cache them when they are the only teacher signal")
    normalize_hidden: bool = _f(False, "divide each hidden-state MSE by the teacher states' mean square, so the term "
                                       "is scale-free (1.0 = the whole teacher signal missed) and cannot swamp the "
                                       "logit term; TinyBERT's raw MSE grows with the teacher's activation scale. Off "
                                       "by default: no benchmark has measured it yet (the gradient norms at the "
                                       "start of each run, logged to MLflow, show when a term dominates)")
    transfer: TransferConfig = field(default_factory=lambda: TransferConfig())


@dataclass
class TrainConfig:
    num_epochs: float = _f(3.0, "epochs over the train set")
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps (overrides num_epochs)")
    batch_size: int = _f(32, "per-process train batch size")
    eval_batch_size: int = _f(128, "per-process dev batch size")
    learning_rate: float = _f(1e-4, "peak learning rate of AdamW")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_ratio: float = _f(0.1, "fraction of steps of linear warm-up, then linear decay to 0")
    grad_accum_steps: int = _f(1, "gradient accumulation steps per optimizer step")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    mixed_precision: Optional[str] = _f(None, "no, bf16 or fp16 (fp16 needs a GPU); default: what `accelerate launch` "
                                              "was given (--mixed_precision or its config file), else no")
    eval_every_steps: Optional[int] = _f(None, "evaluate every N optimizer steps; default once per epoch")
    early_stopping_patience: Optional[int] = _f(None, "stop after N evaluations without improvement")
    save_state_every_steps: Optional[int] = _f(None, "save the whole training state (model, optimizer, scheduler, "
                                                     "RNG, step) every N steps, atomically; the same command after a "
                                                     "crash then resumes from the newest complete state")
    resume_from: Optional[str] = _f(None, "state folder to resume from, or 'latest' (also to extend a finished run)")
    log_every_steps: int = _f(10, "log the loss every N steps")
    seed: int = _f(42, "seed for data order, initialisation and dropout")


@dataclass
class GenerationConfig:
    """How seq2seq models decode, for dev metrics and for latency (task.type=seq2seq)."""
    num_beams: int = _f(1, "beam size (1 = greedy)")
    max_new_tokens: int = _f(64, "longest output in tokens")
    lowercase: Optional[bool] = _f(None, "score lower-cased text; default: when the tokenizer lower-cases "
                                         "(uncased BERT/MiniLM vocabularies cannot produce capitals)")


@dataclass
class TargetConfig:
    device: str = _f("cpu", "cpu or cuda")
    threads: int = _f(1, "CPU threads used when measuring (clamped, with a warning, to the CPUs present)")
    batch_size: int = _f(1, "batch size of a request")
    seq_len: Any = _f("data", "fixed token length, or 'data' to sample real lengths from the dev set")
    warmup_iters: int = _f(10, "untimed calls per candidate before timing")
    min_iters: int = _f(30, "timed calls per candidate, at least")
    min_seconds: float = _f(2.0, "timed seconds per candidate, at least")
    repeats: int = _f(5, "interleaved timing rounds across candidates (drift lands on all alike)")
    p95_tolerance: float = _f(0.10, "a p95 is repeatable when its 95 % bootstrap interval across the interleaved "
                                    "rounds is within +-this fraction of it; else more rounds are timed")
    max_rounds: int = _f(15, "interleaved rounds at most: more are added (beyond `repeats`) while a p95 is not "
                             "repeatable or its interval straddles the budget; then the verdict is 'uncertain'")
    p95_ms: Any = _f(None, "p95 latency budget in ms, absolute or relative to the fp32 teacher: 'teacher*0.25'")
    min_quality: Any = _f(None, "quality floor (task.metric, a fraction), absolute or 'teacher*0.97'")
    max_size_mb: Any = _f(None, "size budget of the served artefact in MB, absolute or 'teacher*0.5'")


# The recipes distill/quantize.py registers, in its ladder order (tests/test_config.py checks that they agree).
# Named here so that checking a config does not import torch with the recipes.
RECIPE_LADDER = ("fp32", "bf16", "fp16", "dynamic-int8", "onnx-fp32", "onnx-int8-ffn", "onnx-int8", "bnb-int8",
                 "bnb-nf4")


@dataclass
class QuantizationConfig:
    recipes: list = field(default_factory=lambda: list(RECIPE_LADDER), metadata={
        "help": "recipes the gate tries, cheapest change first; default the full ladder "
                "(fp32, bf16, fp16, dynamic-int8, onnx-fp32, onnx-int8-ffn, onnx-int8, bnb-int8, bnb-nf4)"})
    allow_cpu_bf16: bool = _f(False, "try bf16 on CPU (fast only with AMX/AVX512-BF16; skipped otherwise)")


INIT_CHOICES = ("teacher-layers", "teacher-slice", "random")
LABEL_FORMS = ("auto", "fp32", "onnx-int8")
SAMPLERS = ("tpe", "nsga2", "random")


@dataclass
class SearchConfig:
    """The student search (`kdlab search`, search/study.py). A range is an int or number (fixed), a list
    (choices), or {min, max} with `step` (ints) or `log` (floats); unset ranges follow the teacher."""
    n_trials: int = _f(20, "students trained per `kdlab search` call (screened-out and repeated candidates do not "
                           "count); a resumed study gets this many more")
    max_draws: Optional[int] = _f(None, "trials one call may start, trained or not (screened out, repeats); the "
                                        "call ends at n_trials trained or at this many; default 5 x n_trials")
    timeout_s: Optional[float] = _f(None, "start no new trial after this many seconds (the running one finishes)")
    sampler: str = _f("tpe", "tpe (multi-objective TPE with constraints; see search/study.py), nsga2, random")
    storage: Optional[str] = _f(None, "Optuna RDB URL (sqlite:///..., postgresql://...); "
                                "default sqlite:///<output_dir>/optuna.db")
    study_name: Optional[str] = _f(None, "Optuna study name; default the config's name")
    seed: Optional[int] = _f(None, "the sampler's seed; default train.seed (which also seeds each student's "
                                   "training and is part of the fine-tuned teacher's identity)")
    heartbeat_s: int = _f(60, "a running trial records a heartbeat this often; one silent for 2x this long (its "
                              "worker was killed or lost) is marked FAIL by the next worker and retried")
    max_retries: int = _f(2, "retries of a trial whose worker died (its params are enqueued again)")
    num_layers: Any = _f(None, "student layers (range); default 1..the teacher's layers")
    encoder_layers: Any = _f(None, "seq2seq: student encoder layers (range); default the teacher's")
    decoder_layers: Any = _f(None, "seq2seq: student decoder layers (range); default 1..the teacher's")
    hidden_size: Any = _f(None, "student width (range); default the teacher's width")
    num_heads: Any = _f(None, "head counts (range); per width only those dividing it are drawn; "
                        "default keeps the teacher's head size")
    intermediate_size: Any = _f(None, "FFN width (range); default the teacher's FFN/hidden ratio")
    init: list = _f(["teacher-layers", "teacher-slice"],
                    "allowed initialisations: teacher weights (teacher-layers at the teacher's widths, "
                    "teacher-slice when narrower) and/or random (drawn, or when teacher weights cannot fit)")
    recipes: Optional[list] = _f(None, "quantization recipes drawn per trial; default fp32 and dynamic-int8 (cpu), "
                                 "fp32 and fp16 (cuda)")
    learning_rate: Any = _f(None, "range; default train.learning_rate (not searched)")
    temperature: Any = _f(None, "KD temperature (range); default distill.temperature")
    alpha: Any = _f(None, "KD weight in [0, 1] (range); default distill.alpha")
    train_steps: Optional[int] = _f(None, "optimizer steps per trial (overrides train_epochs)")
    train_epochs: float = _f(1.0, "epochs per trial when train_steps is unset")
    seed_trials: int = _f(3, "teacher-layer subsets at full width enqueued before the sampler takes over")
    families: Optional[list] = _f(None, "student families drawn per trial: teacher (cut from the teacher) and/or "
                                  "pretrained models (a folder, a Hub id, or a named family: minilm-l6), each "
                                  "with its own tokenizer and shape; default [student.pretrained or teacher]")
    screen_margin: float = _f(0.05, "reject an untrained candidate only above p95 budget * (1 + margin): "
                              "timing noise; the trained one is judged on the budget itself")
    latency_samples: int = _f(40, "untrained (architecture, recipe) points timed before the first trial to fit a "
                                  "latency model that rules out draws too slow for the budget (cached per machine "
                                  "and target profile); 0: no model, every draw is built and timed")
    latency_recheck: int = _f(6, "cached latency-model points re-timed when a study reads the table: each recipe's "
                                 "cached points are scaled by how much slower or faster they time now (a shared "
                                 "machine's speed drifts); 0 trusts the cache")
    stop_at: list = _f([0.25, 0.5], "fractions of a trial's steps at which a student that cannot make the quality "
                                    "floor, or that the front already beats, stops training (search/early_stop.py); "
                                    "[] trains every trial to the end")
    stop_headroom: float = _f(0.02, "least quality rise still assumed possible after a stop point (the study's "
                                    "completed curves raise it to the largest rise they show)")
    stop_allowance: float = _f(0.01, "how much the served artefact may score above the fp32 weights evaluated "
                                     "during training: the floor rule stops only below floor - allowance - headroom")
    stop_margin: float = _f(0.02, "a front member at least this much better at the same fraction, no slower and no "
                                  "larger, stops the trial")
    recipe_fallback: bool = _f(True, "a trained student whose served artefact agrees with its own fp32 weights below "
                                     "export.min_label_agreement is served under the space's other recipes, fastest "
                                     "first, until one agrees (no retraining); the trial records the recipe it ends "
                                     "with. false: the trial stays infeasible")


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "log to MLflow")
    uri: str = _f("sqlite:///runs/mlflow.db", "MLflow tracking URI (SQLite file, or an http:// server)")
    experiment: Optional[str] = _f(None, "MLflow experiment; default the config's name")


@dataclass
class ExportConfig:
    out_dir: Optional[str] = _f(None, "where `kdlab export` writes; default <output_dir>/export")
    model_name: Optional[str] = _f(None, "MLflow Model Registry name; default the config's name")
    alias: str = _f("champion", "registry alias set on the exported version")
    min_label_agreement: float = _f(0.99, "refuse an export whose served artefact agrees with the fp32 model "
                                          "on fewer dev labels than this")
    max_quality_drop: float = _f(1.0, "seq2seq: refuse an export whose served artefact scores more than this many "
                                      "points of task.metric (e.g. BLEU) below the fp32 model on the dev set")
    latency_batch_sizes: list = _f([1, 8, 32], "batch sizes of the model card's latency table")
    register: bool = _f(True, "log the export as an MLflow model and register it (needs tracking.enabled)")


@dataclass
class ServingConfig:
    target_rps: Optional[float] = _f(None, "requests per second to plan for (the capacity plan is skipped when unset)")
    p95_slo_ms: Optional[float] = _f(None, "p95 latency SLO of one request through the server, in ms; required when "
                                           "planning (serving.target_rps set): target.p95_ms is a model budget, not "
                                           "a serving SLO")
    max_batch_size: int = _f(32, "largest batch a replica may serve")
    headroom: float = _f(0.3, "fraction of a replica's measured throughput kept in reserve (applied once)")
    batch_sizes: list = _f([1, 2, 4, 8, 16, 32], "batch sizes measured for the plan")
    # 12 ms: p50 through kdlab serve (1 replica, 1 thread, unbatched, 5 req/s, Poisson arrivals) minus the served
    # artefact's own p50 (tokenizing included), fitted by make bench-serve on this 2-core machine: 9.8 ms in the
    # committed run (benchmarks/results/serve_sst2.json), 11.0 and 11.9 ms in two earlier runs.
    overhead_ms: float = _f(12.0, "time a request spends in the server beyond the model itself (HTTP, proxy, "
                                  "routing, JSON), added to every predicted p95; fit it with kdlab loadtest (its "
                                  "overhead_ms)")
    # 11 ms: the serving stack's CPU a request at 20 req/s in the same runs (Ray's proxy and replica beyond the model).
    stack_cpu_ms: float = _f(11.0, "CPU time a request costs the server beyond the model (HTTP, proxy, routing, JSON, "
                                  "tokenizing), in ms; counts only with serving.cores; kdlab loadtest measures it "
                                  "(its stack_cpu_ms)")
    cores: Optional[float] = _f(None, "CPU cores the replicas and the serving stack share (one machine); unset: each "
                                      "replica has its own cores and the plan bounds only model time")
    batching_gain: float = _f(0.1, "a larger batch is chosen only when it serves this fraction more requests/s than "
                                   "the best smaller one: it costs latency, and a few per cent is timing noise")
    # 9 ms: a Ray Serve replica process's CPU a request beyond the served artefact's own time, unbatched on 1 thread:
    # 7.7 ms fitted by make bench-serve on the SST-2 MiniLM student (onnx-int8; the slope of the replica's CPU
    # between 18 and 74 req/s, benchmarks/results/serve_sst2_minilm.json), 7.9-9.8 ms for that student and 9.4 ms
    # for its fp32 teacher at 25-30 req/s in probes here. It runs on the replica's event loop, which takes turns
    # with the model's Python on one interpreter lock: the fp32 teacher, 14-15 ms alone, served at most 38-43
    # req/s on one replica, not the 1 / 14 ms its latency implies.
    replica_ms: float = _f(9.0, "a request's own work in its replica beyond the model (receiving, parsing, answering), "
                                "in ms, serial with the model: a replica serves a batch of b in p50(b) + b x "
                                "replica_ms; make bench-serve fits it (fit.replica_ms)")
    # 1 is the M/G/1 wait alone. With server, replicas and load generator on 2 shared cores, a request also queues
    # for the CPU behind the proxy's and Locust's work, which that wait does not see: make bench-serve fits the
    # factor that makes the model reproduce one configuration's measured sustained rate (fit.wait_factor in
    # benchmarks/results/serve_sst2.json) and predicts the others with it.
    wait_factor: float = _f(1.0, "multiplies the predicted queueing wait (> 1 where replicas share cores with the "
                                 "serving stack and it queues too); fitted on one configuration by make bench-serve")


@dataclass
class Config:
    name: str = _f("kdlab", "run name: experiment name and run folder runs/<name>/")
    output_dir: Optional[str] = _f(None, "where the run writes; default runs/<name>")
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    config_path: Optional[str] = field(default=None, metadata={"help": "set by the loader", "internal": True})

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or os.path.join("runs", self.name))


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read YAML, apply `key.sub=value` overrides, build and validate the typed config."""
    label = "<defaults>" if path is None else str(path)
    cfg = build(Config, read_tree(path, overrides), label)
    cfg.config_path = None if path is None else str(path)
    validate(cfg, label)
    return cfg


# ---------------------------------------------------------------- checks, one function per section
#
# Each takes the config and `c(ok, key, message)`, which raises the one-line ConfigError
# "<file>: <key>: <message>". `validate` runs them in a fixed order: with several mistakes, the
# first one in that order is the one reported.


def _check(ok: bool, label: str, key: str, message: str):
    if not ok:
        raise ConfigError(f"{label}: {key}: {message}")


def validate(cfg: Config, label: str = "<config>") -> None:
    """Range checks that need no file or model; each failure names the key and what is valid."""
    c = lambda ok, key, msg: _check(ok, label, key, msg)  # noqa: E731
    task = _check_task(cfg, c, label)
    task.check_config(cfg, c)
    check_unused(cfg, task, c)
    _check_data(cfg, c)
    _check_teacher(cfg, c)
    _check_student(cfg, c)
    _check_distill(cfg, c)
    _check_train(cfg, c)
    _check_target(cfg, c, label)
    _check_quantization(cfg, c)
    _check_search(cfg, c, label)
    _check_export(cfg, c)
    _check_serving(cfg, c)


def quality_scale(cfg: Config) -> float:
    """The largest value of task.metric: 1 for accuracy/F1 (fractions), 100 for BLEU, chrF, ROUGE, exact match."""
    return task_of(cfg).quality_scale


def _check_task(cfg: Config, c, label: str):
    try:
        task = task_of(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    c(cfg.task.metric in task.metrics, "task.metric", f"'{cfg.task.metric}' for task.type={cfg.task.type}; valid: "
      + ", ".join(task.metrics))
    return task


def _check_data(cfg: Config, c) -> None:
    d = cfg.data
    c(bool(d.dataset) or bool(d.train_file and d.eval_file), "data",
      "give data.dataset (Hub name) or both data.train_file and data.eval_file")
    c(not (d.test_file and d.test_split), "data.test_file", "give data.test_file or data.test_split, not both")
    c(not (d.test_split and not d.dataset), "data.test_split", "needs data.dataset (a Hub dataset); for a local file "
                                                                "use data.test_file")
    for key in ("max_train_samples", "max_eval_samples", "max_length"):
        v = getattr(d, key)
        c(v is None or v > 0, f"data.{key}", f"must be a positive integer, got {v}")


def _check_teacher(cfg: Config, c) -> None:
    c(cfg.teacher.fine_tune in ("auto", "always", "never"), "teacher.fine_tune",
      f"'{cfg.teacher.fine_tune}'; valid: auto, always, never")
    c(cfg.teacher.num_epochs > 0, "teacher.num_epochs", "must be > 0")


def _divisors(n: int) -> str:
    return ", ".join(str(h) for h in range(1, n + 1) if n % h == 0 and h <= 64)


def _check_student(cfg: Config, c) -> None:
    s = cfg.student
    c(s.num_layers >= 1, "student.num_layers", f"must be >= 1, got {s.num_layers}")
    c(s.init in INIT_CHOICES, "student.init", f"'{s.init}'; valid: {', '.join(INIT_CHOICES)}")
    for key in ("hidden_size", "num_heads", "intermediate_size"):
        v = getattr(s, key)
        c(v is None or v > 0, f"student.{key}", f"must be a positive integer, got {v}")
    if s.hidden_size and s.num_heads:
        c(s.hidden_size % s.num_heads == 0, "student.num_heads",
          f"{s.num_heads} heads do not divide hidden_size {s.hidden_size}; valid: {_divisors(s.hidden_size)}")
    if s.layer_map is not None:
        c(len(s.layer_map) == s.num_layers, "student.layer_map",
          f"needs one teacher layer per student layer ({s.num_layers}), got {len(s.layer_map)}")


def _check_distill(cfg: Config, c) -> None:
    k = cfg.distill
    c(k.temperature > 0, "distill.temperature", f"must be > 0, got {k.temperature}")
    c(0.0 <= k.alpha <= 1.0, "distill.alpha", f"must be in [0, 1], got {k.alpha}")
    c(k.hidden_weight >= 0 and k.attention_weight >= 0, "distill", "loss weights must be >= 0")
    c(k.attention_loss in ("tinybert", "minilm"), "distill.attention_loss",
      f"'{k.attention_loss}'; valid: tinybert, minilm")
    tr, a = k.transfer, k.transfer.augment
    for key in ("mask_prob", "replace_prob", "ngram_prob"):
        v = getattr(a, key)
        c(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, f"distill.transfer.augment.{key}",
          f"must be a probability in [0, 1], got {v}")
    c(a.mask_prob + a.replace_prob <= 1.0, "distill.transfer.augment",
      f"mask_prob + replace_prob must be <= 1 (one draw per word), got {a.mask_prob + a.replace_prob:g}")
    c(a.copies >= 0, "distill.transfer.augment.copies", f"must be >= 0, got {a.copies}")
    c(a.ngram_max >= 1, "distill.transfer.augment.ngram_max", f"must be >= 1, got {a.ngram_max}")
    c(tr.max_unlabelled is None or tr.max_unlabelled >= 1, "distill.transfer.max_unlabelled",
      f"must be >= 1, got {tr.max_unlabelled}")
    c(isinstance(tr.min_words, int) and not isinstance(tr.min_words, bool) and tr.min_words >= 0,
      "distill.transfer.min_words", f"must be an integer >= 0, got {tr.min_words!r}")
    c(tr.label_with in LABEL_FORMS, "distill.transfer.label_with",
      f"'{tr.label_with}'; valid: {', '.join(LABEL_FORMS)}")
    c(0.0 <= tr.min_agreement <= 1.0, "distill.transfer.min_agreement", f"must be in [0, 1], got {tr.min_agreement}")
    c(tr.batch_size >= 1, "distill.transfer.batch_size", f"must be >= 1, got {tr.batch_size}")
    c(not (tr.unlabelled_train and not cfg.data.max_train_samples), "distill.transfer.unlabelled_train",
      "needs data.max_train_samples (the labelled subset); without it every train row is labelled")
    if tr.enabled:
        c(k.alpha > 0, "distill.alpha", "must be > 0 with a transfer set (its rows train on KD alone)")


def _check_train(cfg: Config, c) -> None:
    t = cfg.train
    c(t.batch_size >= 1 and t.eval_batch_size >= 1, "train.batch_size", "must be >= 1")
    c(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
    c(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    c(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    c(t.early_stopping_patience is None or t.early_stopping_patience >= 1, "train.early_stopping_patience",
      f"must be >= 1 evaluations, or null for no early stopping; got {t.early_stopping_patience}")
    c(t.save_state_every_steps is None or t.save_state_every_steps >= 1, "train.save_state_every_steps",
      f"must be >= 1 steps, or null to save no training state; got {t.save_state_every_steps}")
    c(t.num_epochs > 0 or (t.max_steps or 0) > 0, "train.num_epochs", "must be > 0 (or set train.max_steps)")
    c(t.mixed_precision in (None, "no", "bf16", "fp16"), "train.mixed_precision",
      f"'{t.mixed_precision}'; valid: no, bf16, fp16")


def _check_target(cfg: Config, c, label: str) -> None:
    t = cfg.target
    c(t.device in ("cpu", "cuda"), "target.device", f"'{t.device}'; valid: cpu, cuda")
    c(t.threads >= 1, "target.threads", f"must be >= 1, got {t.threads}")
    c(t.batch_size >= 1, "target.batch_size", f"must be >= 1, got {t.batch_size}")
    c(t.seq_len == "data" or (isinstance(t.seq_len, int) and not isinstance(t.seq_len, bool) and t.seq_len >= 1),
      "target.seq_len", f"{t.seq_len!r}; valid: a positive integer, or 'data' (real dev-set lengths)")
    c(t.warmup_iters >= 0, "target.warmup_iters", f"must be >= 0, got {t.warmup_iters}")
    c(t.min_iters >= 1, "target.min_iters", f"must be >= 1, got {t.min_iters}")
    c(t.min_seconds >= 0, "target.min_seconds", f"must be >= 0, got {t.min_seconds}")
    c(t.repeats >= 1, "target.repeats", f"must be >= 1, got {t.repeats}")
    c(t.p95_tolerance > 0, "target.p95_tolerance", f"must be > 0, got {t.p95_tolerance}")
    c(t.max_rounds >= t.repeats, "target.max_rounds", f"must be >= target.repeats ({t.repeats}), got {t.max_rounds}")
    for key in ("p95_ms", "min_quality", "max_size_mb"):
        try:
            parsed = parse_budget(getattr(t, key), key)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        if key == "min_quality" and parsed and parsed[0] == "abs":
            scale = quality_scale(cfg)
            c(parsed[1] <= scale, "target.min_quality",
              f"{parsed[1]} is above {scale:g}; quality ({cfg.task.metric}) lies in (0, {scale:g}]")


def _check_quantization(cfg: Config, c) -> None:
    q, valid = cfg.quantization, RECIPE_LADDER
    c(len(q.recipes) > 0, "quantization.recipes", f"is empty; valid: {', '.join(valid)}")
    for name in q.recipes:
        c(name in valid, "quantization.recipes", f"unknown recipe {name!r}; valid: {', '.join(valid)}")
    c(len(set(q.recipes)) == len(q.recipes), "quantization.recipes", f"lists a recipe twice: {q.recipes}")


def search_recipes(cfg: Config) -> list:
    """The recipes a search tries: search.recipes, or the default for the target device."""
    if cfg.search.recipes is not None:
        return list(cfg.search.recipes)
    return ["fp32", "fp16"] if cfg.target.device == "cuda" else ["fp32", "dynamic-int8"]


def search_families(cfg: Config) -> list:
    """The student families a search draws from: search.families, or the one the student section names."""
    if cfg.search.families is not None:
        return list(cfg.search.families)
    return [cfg.student.pretrained or "teacher"]


def search_ranges(cfg: Config) -> dict:
    """The searched dimensions as Ranges (None: derived from the teacher or the train/distill sections)."""
    s = cfg.search
    return {
        "num_layers": parse_range(s.num_layers, "num_layers", True, 1),
        "encoder_layers": parse_range(s.encoder_layers, "encoder_layers", True, 1),
        "decoder_layers": parse_range(s.decoder_layers, "decoder_layers", True, 1),
        "hidden_size": parse_range(s.hidden_size, "hidden_size", True, 1),
        "num_heads": parse_range(s.num_heads, "num_heads", True, 1),
        "intermediate_size": parse_range(s.intermediate_size, "intermediate_size", True, 1),
        "learning_rate": parse_range(s.learning_rate, "learning_rate", False, 0, inclusive=False),
        "temperature": parse_range(s.temperature, "temperature", False, 0, inclusive=False),
        "alpha": parse_range(s.alpha, "alpha", False, 0, maximum=1),
    }


def _check_search(cfg: Config, c, label: str) -> None:
    s = cfg.search
    c(s.n_trials >= 1, "search.n_trials", f"must be >= 1, got {s.n_trials}")
    c(s.max_draws is None or s.max_draws >= 1, "search.max_draws", f"must be >= 1, got {s.max_draws}")
    c(s.timeout_s is None or s.timeout_s > 0, "search.timeout_s", f"must be > 0, got {s.timeout_s}")
    c(s.heartbeat_s >= 1, "search.heartbeat_s", f"must be >= 1, got {s.heartbeat_s}")
    c(s.max_retries >= 0, "search.max_retries", f"must be >= 0, got {s.max_retries}")
    c(s.sampler in SAMPLERS, "search.sampler", f"'{s.sampler}'; valid: {', '.join(SAMPLERS)}")
    c(s.train_steps is None or s.train_steps >= 1, "search.train_steps", f"must be >= 1, got {s.train_steps}")
    c(s.train_epochs > 0, "search.train_epochs", f"must be > 0, got {s.train_epochs}")
    c(s.seed_trials >= 0, "search.seed_trials", f"must be >= 0, got {s.seed_trials}")
    c(s.screen_margin >= 0, "search.screen_margin", f"must be >= 0, got {s.screen_margin}")
    c(isinstance(s.stop_at, list) and all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1
                                          for f in s.stop_at),
      "search.stop_at", f"must be a list of fractions in (0, 1), got {s.stop_at!r}")
    c(s.latency_samples >= 0, "search.latency_samples", f"must be >= 0, got {s.latency_samples}")
    c(s.latency_recheck >= 0, "search.latency_recheck", f"must be >= 0, got {s.latency_recheck}")
    for key in ("stop_headroom", "stop_allowance", "stop_margin"):
        c(getattr(s, key) >= 0, f"search.{key}", f"must be >= 0, got {getattr(s, key)}")
    c(s.storage is None or bool(str(s.storage).strip()), "search.storage", "is empty; valid: an RDB URL such as sqlite:///runs/x/optuna.db")
    try:
        ranges = search_ranges(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    hidden, heads = ranges["hidden_size"], ranges["num_heads"]
    if hidden is not None and heads is not None:
        tried = heads.values()
        useless = [h for h in hidden.values() if not any(h % n == 0 for n in tried)]
        c(len(useless) < len(hidden.values()), "search.num_heads",
          f"no head count in {tried} divides any search.hidden_size {hidden.values()}")
        if useless:
            c(False, "search.num_heads", f"no head count in {tried} divides search.hidden_size {useless[0]}; "
                                         f"valid for {useless[0]}: {_divisors(useless[0])}")
    if s.families is not None:
        c(isinstance(s.families, list) and len(s.families) > 0
          and all(isinstance(f, str) and f.strip() for f in s.families), "search.families",
          f"must be a non-empty list of names, got {s.families!r}; valid: teacher, minilm-l6, a model folder or Hub id")
        c(len(set(s.families)) == len(s.families), "search.families", f"lists a family twice: {s.families}")
    c(len(s.init) > 0, "search.init", f"is empty; valid: {', '.join(INIT_CHOICES)}")
    for name in s.init:
        c(name in INIT_CHOICES, "search.init", f"unknown init {name!r}; valid: {', '.join(INIT_CHOICES)}")
    recipes, valid = search_recipes(cfg), RECIPE_LADDER
    c(len(recipes) > 0, "search.recipes", f"is empty; valid: {', '.join(valid)}")
    for name in recipes:
        c(name in valid, "search.recipes", f"unknown recipe {name!r}; valid: {', '.join(valid)}")
    c(len(set(recipes)) == len(recipes), "search.recipes", f"lists a recipe twice: {recipes}")
    device = cfg.target.device
    for name in recipes:  # recipes that cannot run on the target would fail every trial that draws them
        c(not (name == "fp16" and device == "cpu"), "search.recipes", "fp16 needs target.device=cuda; valid on cpu: "
          + ", ".join(r for r in valid if r not in ("fp16", "bf16")))
        c(not (name == "bf16" and device == "cpu" and not cfg.quantization.allow_cpu_bf16), "search.recipes",
          "bf16 on cpu needs quantization.allow_cpu_bf16=true")
        c(not (device == "cuda" and (name == "dynamic-int8" or name.startswith("onnx"))), "search.recipes",
          f"{name} runs on cpu only; valid on cuda: fp32, bf16, fp16, bnb-int8, bnb-nf4")


def _check_export(cfg: Config, c) -> None:
    e = cfg.export
    c(0.0 <= e.min_label_agreement <= 1.0, "export.min_label_agreement",
      f"must be in [0, 1], got {e.min_label_agreement}")
    c(e.max_quality_drop >= 0, "export.max_quality_drop", f"must be >= 0, got {e.max_quality_drop}")
    c(isinstance(e.latency_batch_sizes, list) and len(e.latency_batch_sizes) > 0
      and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in e.latency_batch_sizes),
      "export.latency_batch_sizes", f"must be a non-empty list of integers >= 1, got {e.latency_batch_sizes!r}")
    c(bool(e.alias) and e.alias.replace("-", "").replace("_", "").isalnum(), "export.alias",
      f"'{e.alias}'; valid: letters, digits, '-' and '_'")


def _check_serving(cfg: Config, c) -> None:
    sv = cfg.serving
    c(sv.target_rps is None or sv.target_rps > 0, "serving.target_rps", f"must be > 0, got {sv.target_rps}")
    c(sv.p95_slo_ms is None or sv.p95_slo_ms > 0, "serving.p95_slo_ms", f"must be > 0, got {sv.p95_slo_ms}")
    c(sv.target_rps is None or sv.p95_slo_ms is not None, "serving.p95_slo_ms",
      f"not set; planning for serving.target_rps {sv.target_rps:g} needs the SLO of a request through the server in "
      f"ms (e.g. serving.p95_slo_ms=50); target.p95_ms is the model's own budget, not a serving SLO"
      if sv.target_rps is not None else "")
    c(sv.overhead_ms >= 0, "serving.overhead_ms", f"must be >= 0, got {sv.overhead_ms}")
    c(sv.batching_gain >= 0, "serving.batching_gain", f"must be >= 0, got {sv.batching_gain}")
    c(sv.wait_factor > 0, "serving.wait_factor", f"must be > 0, got {sv.wait_factor}")
    c(sv.stack_cpu_ms >= 0, "serving.stack_cpu_ms", f"must be >= 0, got {sv.stack_cpu_ms}")
    c(sv.replica_ms >= 0, "serving.replica_ms", f"must be >= 0, got {sv.replica_ms}")
    c(sv.cores is None or sv.cores > 0, "serving.cores", f"must be > 0 (or unset), got {sv.cores}")
    c(0.0 <= sv.headroom < 1.0, "serving.headroom", f"must be in [0, 1), got {sv.headroom}")
    c(isinstance(sv.max_batch_size, int) and sv.max_batch_size >= 1, "serving.max_batch_size",
      f"must be an integer >= 1, got {sv.max_batch_size!r}")
    c(isinstance(sv.batch_sizes, list) and len(sv.batch_sizes) > 0
      and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sv.batch_sizes),
      "serving.batch_sizes", f"must be a non-empty list of integers >= 1, got {sv.batch_sizes!r}")
