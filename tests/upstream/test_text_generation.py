"""Megatron-LM's own generation scripts through ``--plugin aquila2``: the REST server
(``tools/run_text_generation_server.py``) at TP=1 and TP=2, its CLI client (``tools/text_generation_cli.py``) and
the static inference example (``examples/inference/gpt/gpt_static_inference.py``), held to ``transformers``'
greedy ``generate`` on the same weights.

Needs a Megatron-LM checkout (tag core_v0.16.1) at MEGATRON_LM_PATH; skipped otherwise. CI runs without it.
The server is bound to 127.0.0.1 (``--host``) and spoken to only there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import torch

from conftest import run_python

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
# three prompts of different lengths, one Chinese
PROMPTS = ["北京是中国的首都，也是", "Hello", "The quick brown fox jumps over the lazy dog and then"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_hf_dir) -> Path:
    """The tiny HF model converted to a torch_dist checkpoint (loaded at TP=1 and at TP=2)."""
    return _converted(tmp_path_factory, tiny_hf_dir, "torch_dist")


def _converted(tmp_path_factory, hf_dir: Path, ckpt_format: str) -> Path:
    from aquila_npu.convert import ConvertOptions, convert

    target = tmp_path_factory.mktemp("served") / ckpt_format
    convert(ConvertOptions(load_dir=str(hf_dir), save_dir=str(target), ckpt_format=ckpt_format, progress=False))
    return target


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, tokenizer_dir) -> dict[str, list[int]]:
    return _greedy(tiny_hf_dir, tokenizer_dir)


def _greedy(tiny_hf_dir, tokenizer_dir) -> dict[str, list[int]]:
    """transformers' greedy generate per prompt: BOS + the prompt's ids, then NEW_TOKENS tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aquila_npu.plugins.aquila2 import FAMILY

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        ids = [FAMILY.tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=FAMILY.tokenizer.eos_token_id, pad_token_id=0)
        out[prompt] = generated[0].tolist()
    return out


def _launch_args(script: str, checkpoint: Path, tokenizer_dir: Path, tp: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
            str(Path(MEGATRON_LM_PATH) / script), "--plugin", "aquila2", "--model", "aquila2-tiny",
            "--tensor-model-parallel-size", str(tp), "--load", str(checkpoint), "--auto-detect-ckpt-format",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir),
            "--micro-batch-size", "1"]


@contextlib.contextmanager
def serving(checkpoint: Path, tokenizer_dir: Path, tp: int, log: Path):
    """The server on 127.0.0.1 at ``tp``; stopped (its whole process tree) when the block ends."""
    from aquila_npu.distributed import free_port

    port = free_port()
    args = _launch_args("tools/run_text_generation_server.py", checkpoint, tokenizer_dir, tp)
    with open(log, "w") as out:
        launcher = subprocess.Popen([sys.executable, *args, "--port", str(port), "--host", "127.0.0.1"],
                                    cwd=MEGATRON_LM_PATH, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        while True:
            assert launcher.poll() is None, f"the server exited ({launcher.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"the server did not come up:\n{log.read_text()[-4000:]}"
            with contextlib.suppress(requests.ConnectionError):
                requests.put(f"{url}/api", json={}, timeout=5)
                break
            time.sleep(2)
        tree = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
        assert len(tree) == 1 + tp, [p.cmdline() for p in tree]  # the launcher and one process per rank
        yield url
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=60)
        _gone, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, f"left behind: {[p.pid for p in alive]}"


def _generate(url: str, prompts: list[str]) -> requests.Response:
    return requests.put(f"{url}/api", json={"prompts": prompts, "tokens_to_generate": NEW_TOKENS, "top_k": 1},
                        timeout=300)


@pytest.mark.parametrize("tp", [1, 2])
def test_the_rest_server_generates_what_transformers_generates(tmp_path, checkpoint, tokenizer_dir, reference,
                                                               tp):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with serving(checkpoint, tokenizer_dir, tp, tmp_path / "server.log") as url:
        answer = _generate(url, PROMPTS)
        assert answer.status_code == 200, answer.text
        assert answer.json()["tokens"] == [reference[p] for p in PROMPTS]

        completions = requests.post(f"{url}/completions", timeout=300,
                                    json={"prompt": PROMPTS, "max_tokens": NEW_TOKENS, "temperature": 0})
        assert completions.status_code == 200, completions.text
        for prompt, choice in zip(PROMPTS, completions.json()["choices"]):
            prompt_length = 1 + len(tokenizer(prompt, add_special_tokens=False).input_ids)
            assert choice["text"] == tokenizer.decode(reference[prompt][prompt_length:], skip_special_tokens=True)

        # refused requests: an HTTP error each, and the server (every rank) serves the next one
        bad_json = requests.put(f"{url}/api", data="{not json", headers={"Content-Type": "application/json"},
                                timeout=60)
        too_many = requests.put(f"{url}/api", json={"prompts": ["x"] * 129}, timeout=60)
        too_long = requests.put(f"{url}/api", json={"prompts": ["hello " * 300], "tokens_to_generate": 4},
                                timeout=300)
        not_text = requests.put(f"{url}/api", json={"prompts": [1, 2]}, timeout=60)
        too_long_completion = requests.post(f"{url}/completions", json={"prompt": "hello " * 300, "max_tokens": 4},
                                            timeout=300)
        assert [r.status_code for r in (bad_json, too_many, too_long, not_text, too_long_completion)] == [400] * 5
        assert "--inference-max-seq-length" in too_long.text and "256" in too_long.text
        again = _generate(url, PROMPTS[1:])
        assert again.status_code == 200, again.text
        assert again.json()["tokens"] == [reference[p] for p in PROMPTS[1:]]

        # Megatron-LM's own command-line client, on the same server (it sends no sampling parameters: the
        # server samples, so the reply is the prompt and some continuation)
        host_port = url[len("http://"):]
        cli = subprocess.run([sys.executable, str(Path(MEGATRON_LM_PATH) / "tools" / "text_generation_cli.py"),
                              host_port], input=f"{PROMPTS[1]}\n{NEW_TOKENS}\n", capture_output=True, text=True,
                             timeout=300)
        assert "Megatron Response: \n" in cli.stdout, cli.stdout + cli.stderr
        reply = cli.stdout.split("Megatron Response: \n", 1)[1].split("\nEnter prompt: ")[0]
        assert reply.startswith(PROMPTS[1]) and len(reply) > len(PROMPTS[1]), reply


def test_the_static_inference_example_generates_what_transformers_generates(tmp_path, tmp_path_factory, tiny_hf_dir,
                                                                            tokenizer_dir, reference):
    checkpoint = _converted(tmp_path_factory, tiny_hf_dir, "torch")  # the other format (detected, as in the scripts)
    output = tmp_path / "results.json"
    result = run_python(*_launch_args("examples/inference/gpt/gpt_static_inference.py", checkpoint, tokenizer_dir, 1),
                        "--prompts", *PROMPTS, "--num-tokens-to-generate", str(NEW_TOKENS), "--top_k", "1",
                        "--output-path", str(output), cwd=MEGATRON_LM_PATH, timeout=900,
                        env={"PYTHONPATH": MEGATRON_LM_PATH})  # how Megatron-LM runs its examples
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = sorted(json.loads(output.read_text()).values(), key=lambda r: PROMPTS.index(r["input_prompt"]))
    assert [r["input_prompt"] for r in results] == PROMPTS
    for prompt, row in zip(PROMPTS, results):
        prompt_length = len(reference[prompt]) - NEW_TOKENS
        assert row["generated_tokens"] == reference[prompt][prompt_length:]


def test_the_static_example_reads_linear_rope_scaling_past_the_unscaled_length(tmp_path, tmp_path_factory,
                                                                                tiny_spec, tokenizer_dir):
    """A tiny model stretched as the 16K models are (1,024 positions, linear RoPE x4): Megatron-LM's builder
    ignores --rotary-seq-len-interpolation-factor for megatron-core models unless the plugin passes it on."""
    from conftest import make_hf_checkpoint

    from aquila_npu import parity
    from aquila_npu.plugins.aquila2 import FAMILY

    spec = tiny_spec.replace(seq_length=1024, max_position_embeddings=1024, rotary_seq_len_interpolation_factor=4.0)
    hf_dir = make_hf_checkpoint(spec, tmp_path / "hf", seed=5)
    checkpoint = _converted(tmp_path_factory, hf_dir, "torch_dist")
    prompt = "北京 Beijing " * 100  # well past 1,024 / 4 tokens
    from transformers import AutoTokenizer

    ids = [FAMILY.tokenizer.bos_token_id] + AutoTokenizer.from_pretrained(str(tokenizer_dir))(
        prompt, add_special_tokens=False).input_ids
    assert 300 < len(ids) < 1000
    expected = parity.hf_greedy(str(hf_dir), [ids], NEW_TOKENS, FAMILY.tokenizer.eos_token_id)[0]
    output = tmp_path / "results.json"
    result = run_python(*_launch_args("examples/inference/gpt/gpt_static_inference.py", checkpoint, tokenizer_dir, 1),
                        "--seq-length", "1024", "--max-position-embeddings", "1024", "--inference-max-seq-length",
                        "1024", "--rotary-seq-len-interpolation-factor", "4", "--prompts", prompt,
                        "--num-tokens-to-generate", str(NEW_TOKENS), "--top_k", "1", "--return-log-probs",
                        "--output-path", str(output), cwd=MEGATRON_LM_PATH, timeout=900,
                        env={"PYTHONPATH": MEGATRON_LM_PATH})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (row,) = json.loads(output.read_text()).values()
    assert row["generated_tokens"] == expected  # hf_greedy returns the new tokens only
    # greedy tokens of a random model hardly depend on positions; its log-probabilities do
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        log_probs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    theirs = log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    ours = torch.tensor(row["logprobs"][:len(ids) - 1])
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_the_static_example_generates_with_lora_adapters(tmp_path, checkpoint, reference, tokenizer_dir):
    """Adapters trained by our driver, given to gpt_static_inference.py as --lora-load (their rank and targets read
    from the checkpoint; the base from --load): greedy tokens equal transformers' on the merged HF export."""
    adapters, merged = tmp_path / "adapters", tmp_path / "merged"
    run_python("-m", "aquila_npu.pretrain", "--model", "aquila2-tiny", "--tokenizer-name-or-path", str(tokenizer_dir),
               "--mock-data", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
               "--train-iters", "3", "--optimizer", "sgd", "--lr", "1", "--log-interval", "1", "--eval-iters", "0",
               "--load", str(checkpoint), "--lora-r", "8", "--lora-alpha", "16", "--save", str(adapters),
               "--ckpt-format", "torch", check=True, timeout=900)
    run_python("-m", "aquila_npu.convert", "--load-dir", str(checkpoint), "--load-model-type", "mg", "--lora-load",
               str(adapters), "--save-model-type", "hf", "--save-dir", str(merged), "--no-progress", check=True)
    expected = _greedy(merged, tokenizer_dir)
    assert expected != reference  # the adapters change what the model says
    output = tmp_path / "results.json"
    result = run_python(*_launch_args("examples/inference/gpt/gpt_static_inference.py", checkpoint, tokenizer_dir, 1),
                        "--lora-load", str(adapters), "--prompts", *PROMPTS, "--num-tokens-to-generate",
                        str(NEW_TOKENS), "--top_k", "1", "--output-path", str(output), cwd=MEGATRON_LM_PATH,
                        timeout=900, env={"PYTHONPATH": MEGATRON_LM_PATH})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = sorted(json.loads(output.read_text()).values(), key=lambda r: PROMPTS.index(r["input_prompt"]))
    for prompt, row in zip(PROMPTS, results):
        prompt_length = len(expected[prompt]) - NEW_TOKENS
        assert row["generated_tokens"] == expected[prompt][prompt_length:], prompt
