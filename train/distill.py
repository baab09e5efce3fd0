"""Distil a student from a teacher under accelerate (fine-tuning the teacher first if needed).

    accelerate launch --config_file configs/accelerate/cpu_1proc.yaml train/distill.py --config configs/smoke.yaml
    accelerate launch train/distill.py --config configs/sst2_minilm.yaml student.num_layers=4 train.learning_rate=1e-4
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train/distill.py --config configs/smoke.yaml

Writes runs/<name>/: config.yaml, teacher/ (fine-tuned, reused while its config is unchanged),
cache/ (teacher logits; for seq2seq, the teacher's beam outputs for sequence-level KD), student/ (best checkpoint + kdlab_summary.json); MLflow runs in
the experiment named after the config. Configuration errors exit with code 2 and one line.
"""
import argparse
import sys

from accelerate import Accelerator

from kdlab.distill.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.learning_rate=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # heavy imports after the cheap checks
        from kdlab.train.pipeline import run
        if cfg.task.type == "seq2seq":
            from kdlab.train.seq2seq import run
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # per-from_pretrained bars; the loop draws its own
        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                  gradient_accumulation_steps=cfg.train.grad_accum_steps)
        summary = run(cfg, accelerator)
    except ConfigError as exc:
        print(f"kdlab: error: {exc}", file=sys.stderr)
        return 2
    if accelerator.is_main_process:
        best = ", ".join(f"dev {k} {v:.4f}" for k, v in summary["best_dev"].items())
        print(f"student {summary['student_params'] / 1e6:.1f}M params: {best} "
              f"(teacher {summary['teacher_dev'][cfg.task.metric]:.4f}) after {summary['steps']} steps, "
              f"{summary['train_seconds']:.0f} s -> {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
