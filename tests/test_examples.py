"""The example launch scripts: their flags parse in the driver and describe the plugin's own model specs, on both
routes (torchrun is replaced by a stand-in that records its arguments)."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO

SCRIPTS = {"pretrain_aquila2_7b_ptd.sh": ("aquila2-7b", 8, 1, False),
           "pretrain_aquila2_34b_ptd_16p.sh": ("aquila2-34b", 8, 2, False),
           "finetune_aquila2_7b_ptd.sh": ("aquila2-7b", 8, 1, True),
           "finetune_aquila2_34b_ptd_16p.sh": ("aquila2-34b", 8, 2, True)}


def _launched(tmp_path, script: str, route: str) -> tuple[str, list[str]]:
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/bash\necho "$PWD"\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "CKPT_SAVE_DIR": "save", "DATA_PATH": "data",
           "TOKENIZER_PATH": "tok", "CKPT_LOAD_DIR": "load", "ROUTE": route,
           "MEGATRON_LM_PATH": str(tmp_path / "megatron-lm")}
    (tmp_path / "megatron-lm").mkdir(exist_ok=True)
    result = subprocess.run(["bash", str(REPO / "examples" / "aquila2" / script)], capture_output=True, text=True,
                            env=env, check=True)
    lines = result.stdout.splitlines()
    return lines[0], lines[1:]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_driver_route_flags_parse_and_match_the_spec(tmp_path, script):
    from aquila_npu import plugin_manager
    from aquila_npu.training.arguments import parse
    from aquila_npu.training.loop import resolve_spec

    model, tp, pp, finetune = SCRIPTS[script]
    _, argv = _launched(tmp_path, script, "driver")
    assert argv[argv.index("-m") + 1] == "aquila_npu.pretrain"
    args = parse(argv[argv.index("-m") + 2:])
    assert (args.model, args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (model, tp, pp)
    assert (args.finetune, args.is_instruction_dataset) == (finetune, finetune)
    plugins = plugin_manager.get()
    # the scripts spell out the architecture as the seed does; it must be exactly the plugin's spec
    assert resolve_spec(args, plugins, None) == plugins.find_model(model)[1]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_megatron_lm_route_uses_megatron_lm_names(tmp_path, script):
    cwd, argv = _launched(tmp_path, script, "megatron-lm")
    assert cwd == str(tmp_path / "megatron-lm")
    assert argv[argv.index("pretrain_gpt.py") + 1:][:4] == ["--plugin", "aquila2", "--model", SCRIPTS[script][0]]
    assert "--tokenizer-model" in argv and "--tokenizer-name-or-path" not in argv
    assert argv[argv.index("--tokenizer-type") + 1] == "HuggingFaceTokenizer"


GENERATE_SCRIPTS = {"generate_aquila2_7b_ptd.sh": ("aquila2-7b", "fp16"),
                    "generate_aquila2_34b_ptd.sh": ("aquila2-34b", "bf16")}


@pytest.mark.parametrize("script", sorted(GENERATE_SCRIPTS))
def test_generate_scripts_parse_and_default_to_chat(tmp_path, script):
    from aquila_npu import plugin_manager
    from aquila_npu.generate.__main__ import build_parser

    model, dtype = GENERATE_SCRIPTS[script]
    _, argv = _launched(tmp_path, script, "driver")
    assert argv[argv.index("-m") + 1] == "aquila_npu.generate"
    args = build_parser().parse_args(argv[argv.index("-m") + 2:])
    assert (args.model, args.tensor_model_parallel_size, args.chat, getattr(args, dtype)) == (model, 8, True, True)
    assert (args.load, args.tokenizer_name_or_path) == ("load", "tok")
    # the chosen size splits 8 ways and the family has the chat template its chat model uses
    family, spec = plugin_manager.get().find_model(model)
    spec.check_parallel(args.tensor_model_parallel_size)
    assert family.chat_template(spec.name).name == {"aquila2-7b": "aquila-v1", "aquila2-34b": "aquila-legacy"}[model]


def test_generate_script_passes_prompts_instead_of_chat(tmp_path):
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TOKENIZER_PATH": "tok", "CHECKPOINT": "ck"}
    script = str(REPO / "examples" / "aquila2" / "generate_aquila2_7b_ptd.sh")
    argv = subprocess.run(["bash", script, "--prompt", "two words", "--greedy"], capture_output=True, text=True,
                          env=env, check=True).stdout.splitlines()
    assert argv[-3:] == ["--prompt", "two words", "--greedy"] and "--chat" not in argv
    assert argv[argv.index("--load") + 1] == "ck"  # the seed's CHECKPOINT variable is accepted too
    env.pop("TOKENIZER_PATH")
    result = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "set TOKENIZER_PATH" in result.stderr


@pytest.mark.parametrize("script, model, dtype", [("serve_aquila2_7b_ptd.sh", "aquila2-7b", "--fp16"),
                                                  ("serve_aquila2_34b_ptd.sh", "aquila2-34b", "--bf16")])
def test_serve_scripts_run_megatron_lms_server_through_the_plugin(tmp_path, script, model, dtype, monkeypatch):
    from aquila_npu import plugin_manager
    from aquila_npu.megatron_lm.arguments import expand_argv

    cwd, argv = _launched(tmp_path, script, "megatron-lm")
    assert cwd == str(tmp_path / "megatron-lm")
    server = argv.index("tools/run_text_generation_server.py")
    assert argv[server + 1:server + 5] == ["--plugin", "aquila2", "--model", model]
    assert (argv[argv.index("--port") + 1], argv[argv.index("--host") + 1]) == ("5000", "0.0.0.0")  # Megatron-LM's
    assert argv[argv.index("--load") + 1] == "load" and argv[argv.index("--tokenizer-model") + 1] == "tok"
    # our start-up hook expands them into Megatron-LM's flags: the model's architecture, TP8 that divides it
    monkeypatch.setenv(plugin_manager.ENV_DEVICE, "cpu")
    expanded, ours, _device = expand_argv(argv[server + 1:], plugin_manager.get())
    assert ours.model == model and dtype in expanded
    spec = plugin_manager.get().find_model(model)[1]
    spec.check_parallel(int(expanded[expanded.index("--tensor-model-parallel-size") + 1]))
    assert expanded[expanded.index("--num-layers") + 1] == str(spec.num_layers)
    monkeypatch.setenv("HOST", "127.0.0.1")
    monkeypatch.setenv("PORT", "5917")
    _, argv = _launched(tmp_path, script, "megatron-lm")
    assert (argv[argv.index("--port") + 1], argv[argv.index("--host") + 1]) == ("5917", "127.0.0.1")


@pytest.mark.parametrize("script, model", [("evaluate_aquila2_7b_ptd.sh", "aquila2-7b"),
                                           ("evaluate_aquila2_34b_ptd.sh", "aquila2-34b")])
def test_evaluate_scripts_parse_with_the_seed_variables(tmp_path, script, model):
    from aquila_npu.evaluate.__main__ import build_parser

    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TOKENIZER_PATH": "tok",
           "CKPT_LOAD_DIR": "ck", "EVAL_DATA_PATH": "boolq/dev.jsonl", "TASK": "mmlu"}
    path = str(REPO / "examples" / "aquila2" / script)
    argv = subprocess.run(["bash", path, "--limit", "5"], capture_output=True, text=True, env=env,
                          check=True).stdout.splitlines()
    args = build_parser().parse_args(argv[argv.index("-m") + 2:])
    assert (args.task_name, args.model, args.load, args.task_data_path) == ("mmlu", model, "ck", "boolq/dev.jsonl")
    assert (args.tensor_model_parallel_size, args.limit) == (8, 5)
    env.pop("EVAL_DATA_PATH")
    result = subprocess.run(["bash", path], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "set EVAL_DATA_PATH" in result.stderr


def test_the_aquilachat2_script_preprocesses_conversations_then_fine_tunes(tmp_path, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from aquila_npu.training.arguments import parse

    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    prefix = tmp_path / "dataset" / "chat"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TOKENIZER_PATH": str(tokenizer_dir),
           "CONVERSATIONS": str(REPO / "examples" / "data" / "conversations" / "alpaca_chat_200.jsonl"),
           "DATA_PATH": str(prefix), "CKPT_LOAD_DIR": "load", "CKPT_SAVE_DIR": "save"}
    result = subprocess.run(["bash", str(REPO / "examples" / "aquila2" / "finetune_aquilachat2_7b_ptd.sh")],
                            capture_output=True, text=True, env=env, check=True)
    # all 200 conversations (none longer than 2,048 tokens), packed: numbered documents, fewer sequences
    numbers = IndexedDataset(f"{prefix}_packed_attention_mask_document")
    assert len(numbers) < 50 and sum(int(numbers[i].max()) for i in range(len(numbers))) == 200
    argv = result.stdout.splitlines()
    args = parse(argv[argv.index("-m") + 2:])
    assert (args.model, args.finetune, args.is_instruction_dataset) == ("aquila2-7b", True, True)
    assert args.data_path == [str(prefix)]
    assert (args.micro_batch_size, args.reset_position_ids, args.reset_attention_mask,
            args.calculate_per_token_loss) == (1, True, True, True)


def test_the_lora_script_trains_adapters_on_both_routes_and_resumes_with_its_optimizer(tmp_path, monkeypatch):
    from aquila_npu import lora, plugin_manager
    from aquila_npu.training.arguments import parse
    from aquila_npu.training.loop import resolve_spec

    monkeypatch.setenv("LORA_LOAD_DIR", "adapters")
    _, argv = _launched(tmp_path, "lora_aquila2_7b_ptd.sh", "driver")
    args = parse(argv[argv.index("-m") + 2:])
    assert lora.options_from_args(args) == lora.LoraOptions(16, 32.0, 0.05, lora.TARGETS)
    assert (args.lora_load, args.load, args.is_instruction_dataset) == ("adapters", "load", True)
    assert not (args.no_load_optim or args.no_load_rng or args.finetune)  # resuming restores the optimizer
    plugins = plugin_manager.get()
    assert resolve_spec(args, plugins, None) == plugins.find_model("aquila2-7b")[1]
    _, upstream = _launched(tmp_path, "lora_aquila2_7b_ptd.sh", "megatron-lm")
    tail = upstream[upstream.index("pretrain_gpt.py") + 1:]
    assert tail[:4] == ["--plugin", "aquila2", "--model", "aquila2-7b"]
    assert tail[tail.index("--lora-r") + 1] == "16" and tail[tail.index("--lora-load") + 1] == "adapters"
