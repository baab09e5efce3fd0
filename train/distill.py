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

from kdlab.distill.config import ConfigError, load_config
from kdlab.distill.task import task_of
from kdlab.train.accel import training_accelerator


def distil(cfg, accelerator) -> dict:
    """One distillation under `cfg` on `accelerator` (kdlab.run_distill); returns the run's kdlab_summary.json."""
    return task_of(cfg).distil(cfg, accelerator)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.learning_rate=1e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Heavy imports after the cheap checks: a bad config is one line before torch and transformers load
        # (this entry script is a CLI boundary, as scripts/cli.py is: tests/test_structure.py LAZY_IMPORTS).
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # per-from_pretrained bars; the loop draws its own
        accelerator = training_accelerator(cfg)
        summary = distil(cfg, accelerator)
    except ConfigError as exc:
        print(f"kdlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The newest complete state (train.save_state_every_steps) is where the same command continues.
        print("\nkdlab: interrupted (distill); run the same command again to continue", file=sys.stderr)
        return 130
    if accelerator.is_main_process:
        best = ", ".join(f"dev {k} {v:.4f}" for k, v in summary["best_dev"].items())
        print(f"student {summary['student_params'] / 1e6:.1f}M params: {best} "
              f"(teacher {summary['teacher_dev'][cfg.task.metric]:.4f}) after {summary['steps']} steps, "
              f"{summary['train_seconds']:.0f} s -> {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
