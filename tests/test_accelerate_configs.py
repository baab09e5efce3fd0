"""The launch configs in configs/accelerate/ read by accelerate itself, without GPUs.

Run: .venv/bin/python -m pytest -q tests/test_accelerate_configs.py

README ("Training across machines and sharded training") says fsdp.yaml and deepspeed_zero2.yaml load as
accelerate configs. Here each file goes through accelerate's own config loader, then through what
`accelerate launch --config_file F` does before it starts processes (merge the file into the launch
arguments, turn them into the environment of the workers), and the FSDP and DeepSpeed plugins the
workers' Accelerator builds are constructed from that environment. Nothing is launched: that needs
GPUs (and, for DeepSpeed, the deepspeed package, which kdlab does not install; the DeepSpeed plugin
itself is accelerate's and is checked here without it).
"""
from __future__ import annotations

import os
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from conftest import ROOT
from kdlab.distill.config import TrainConfig

CONFIGS = ROOT / "configs" / "accelerate"

# file -> (distributed_type, num_processes, num_machines, mixed_precision)
EXPECTED = {
    "cpu_1proc.yaml": (DistributedType.NO, 1, 1, "no"),
    "cpu_2proc.yaml": (DistributedType.MULTI_CPU, 2, 1, "no"),
    "gpu_1.yaml": (DistributedType.NO, 1, 1, "bf16"),
    "gpu_multi.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16"),
    "multi_node_ddp.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16"),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1, "bf16"),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1, "bf16"),
}


def launch_args(name: str):
    """What `accelerate launch --config_file configs/accelerate/NAME train/distill.py` resolves before launching."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train/distill.py"])
    args, defaults, mixed_precision_from_file = _validate_launch_command(args)
    return args, defaults, mixed_precision_from_file


def test_every_file_in_the_folder_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_loads_with_accelerates_loader(name):
    # ClusterConfig.from_yaml_file rejects keys it does not know, so loading also checks every key's name.
    cfg = load_config_from_file(str(CONFIGS / name))
    assert isinstance(cfg, ClusterConfig)
    assert cfg == ClusterConfig.from_yaml_file(str(CONFIGS / name))
    distributed_type, processes, machines, precision = EXPECTED[name]
    assert (cfg.distributed_type, cfg.num_processes, cfg.num_machines, cfg.mixed_precision) == (
        distributed_type, processes, machines, precision)
    assert cfg.main_training_function == "main" and cfg.machine_rank == 0


def test_multi_node_ddp_names_the_rendezvous():
    cfg = load_config_from_file(str(CONFIGS / "multi_node_ddp.yaml"))
    assert (cfg.main_process_ip, cfg.main_process_port, cfg.rdzv_backend, cfg.same_network) == (
        "10.0.0.1", 29500, "static", True)


def test_fsdp_yaml_becomes_an_fsdp2_plugin_that_wraps_bert_layers(tiny_teacher_dir):
    from transformers import AutoModelForSequenceClassification

    from kdlab.distill.config import StudentConfig
    from kdlab.distill.students import build_student
    cfg = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert cfg.fsdp_config == {
        "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "BertLayer", "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_offload_params": False,
        "fsdp_cpu_ram_efficient_loading": False, "fsdp_activation_checkpointing": False}
    args, _, _ = launch_args("fsdp.yaml")
    assert args.use_fsdp and not args.use_deepspeed and args.num_processes == 8 and args.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(args)
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["FSDP_TRANSFORMER_CLS_TO_WRAP"],
            env["FSDP_STATE_DICT_TYPE"], env["ACCELERATE_MIXED_PRECISION"]) == (
        "true", "2", "BertLayer", "FULL_STATE_DICT", "bf16")
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["BertLayer"] and plugin.state_dict_type.name == "FULL_STATE_DICT"
    # A kdlab student (layers copied from a BERT teacher) holds the class the file names: the policy resolves it.
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir, num_labels=2)
    student = build_student(teacher, StudentConfig(num_layers=1))
    plugin.set_auto_wrap_policy(student)
    assert {c.__name__ for c in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]} == {"BertLayer"}


def test_fsdp_yaml_with_t5block_wraps_a_t5_and_bertlayer_does_not():
    """README: edit fsdp_transformer_layer_cls_to_wrap to T5Block for T5 students; unedited, accelerate refuses."""
    from transformers import T5Config, T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4))
    args, _, _ = launch_args("fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env):
        unedited = FullyShardedDataParallelPlugin()
    with pytest.raises(ValueError, match="BertLayer"):
        unedited.set_auto_wrap_policy(t5)
    with mock.patch.dict(os.environ, {**env, "FSDP_TRANSFORMER_CLS_TO_WRAP": "T5Block"}):
        edited = FullyShardedDataParallelPlugin()
    edited.set_auto_wrap_policy(t5)
    assert {c.__name__ for c in edited.auto_wrap_policy.keywords["transformer_layer_cls"]} == {"T5Block"}


def test_deepspeed_yaml_becomes_a_zero2_plugin_matching_the_train_defaults():
    cfg = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    assert cfg.deepspeed_config == {"zero_stage": 2, "offload_optimizer_device": "none", "offload_param_device": "none",
                                    "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                                    "zero3_init_flag": False}
    # README: keep these two equal to train.grad_accum_steps and train.max_grad_norm; as shipped they equal the defaults.
    train = TrainConfig()
    assert (cfg.deepspeed_config["gradient_accumulation_steps"], cfg.deepspeed_config["gradient_clipping"]) == (
        train.grad_accum_steps, train.max_grad_norm)
    args, defaults, from_file = launch_args("deepspeed_zero2.yaml")
    assert args.use_deepspeed and not args.use_fsdp and args.num_processes == 8
    # As accelerate's launch_command does before handing over to the deepspeed launcher (which needs deepspeed).
    args.deepspeed_fields_from_accelerate_config = ",".join(
        [*defaults.deepspeed_config, *(["mixed_precision"] if from_file else [])])
    _, env = prepare_deepspeed_cmd_env(args)
    assert (env["ACCELERATE_USE_DEEPSPEED"], env["ACCELERATE_DEEPSPEED_ZERO_STAGE"],
            env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"], env["ACCELERATE_GRADIENT_CLIPPING"],
            env["ACCELERATE_MIXED_PRECISION"]) == ("true", "2", "1", "1.0", "bf16")
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert (plugin.zero_stage, plugin.gradient_accumulation_steps, plugin.gradient_clipping) == (2, 1, 1.0)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (1, 1.0)
