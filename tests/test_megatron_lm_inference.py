"""The Megatron-LM route's inference patches (``aquila_npu.megatron_lm.inference``), held to megatron-core's own
classes: its tokenizer builder, text generation controller and REST server resource (megatron-core ships them;
the end-to-end runs of Megatron-LM's scripts are in tests/upstream/test_text_generation.py).
"""

from __future__ import annotations

import argparse
import types

import pytest
import torch

from aquila_npu import plugin_manager
from aquila_npu.megatron_lm import inference
from aquila_npu.patching import PatchRegistry
from aquila_npu.plugins.aquila2 import FAMILY


@pytest.fixture
def route_patches(monkeypatch):
    """The plugin's patches applied (those whose module megatron-core lacks stay pending), reverted afterwards."""
    monkeypatch.setenv(plugin_manager.ENV_PLUGINS, "aquila2")
    registry = PatchRegistry()
    inference.aquila_npu_register_patches(registry=registry, device="cpu")
    registry.apply()
    yield registry
    registry.revert()


@pytest.fixture
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _tokenizer_args(tokenizer_dir) -> argparse.Namespace:
    return argparse.Namespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tokenizer_dir),
                              vocab_file=None, merge_file=None, tokenizer_special_tokens=None,
                              tokenizer_hf_use_fast=False, trust_remote_code=False,
                              tokenizer_hf_include_special_tokens=False, tokenizer_metadata=None)


def test_megatron_cores_tokenizer_builder_gives_the_familys_conventions(route_patches, tokenizer_dir, hf_tokenizer):
    from megatron.core.tokenizers.text.utils import build_tokenizer as builder

    tokenizer = builder.build_tokenizer(_tokenizer_args(tokenizer_dir))
    assert isinstance(tokenizer, inference.FamilyTokenizer)
    text = "北京是中国的首都 and more"
    assert tokenizer.tokenize(text) == [FAMILY.tokenizer.bos_token_id] + hf_tokenizer(
        text, add_special_tokens=False).input_ids
    assert (tokenizer.bos, tokenizer.eod) == (FAMILY.tokenizer.bos_token_id, FAMILY.tokenizer.eos_token_id)
    # everything else is megatron-core's tokenizer
    assert tokenizer.detokenize(hf_tokenizer(text, add_special_tokens=False).input_ids) == text
    assert tokenizer.vocab_size == tokenizer._wrapped.vocab_size

    route_patches.revert()
    assert not isinstance(builder.build_tokenizer(_tokenizer_args(tokenizer_dir)), inference.FamilyTokenizer)


def test_the_controller_keeps_the_familys_bos(route_patches, tokenizer_dir, hf_tokenizer):
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )
    from megatron.core.tokenizers.text.utils import build_tokenizer as builder

    controller = types.SimpleNamespace(tokenizer=builder.build_tokenizer(_tokenizer_args(tokenizer_dir)))
    ids = hf_tokenizer("Hello", add_special_tokens=False).input_ids
    bos = FAMILY.tokenizer.bos_token_id
    for add_bos in (False, True):  # megatron-core strips a leading BOS unless add_BOS; the static example never asks
        assert TextGenerationController.tokenize_prompt(controller, "Hello", add_bos) == [bos, *ids]
    route_patches.revert()
    assert TextGenerationController.tokenize_prompt(controller, "Hello", False) == ids


def test_padded_vocabulary_rows_are_never_sampled(route_patches):
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    controller = types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=5),
                                       sampling_rng=torch.Generator().manual_seed(0))
    logits = torch.full((64, 8), -5.0)
    logits[:, 6] = 10.0  # a padded row (tensor-parallel padding) is by far the largest
    logits[:, 2] = 0.0
    greedy = TextGenerationController._torch_sampling_func(controller, logits, 1.0, 1, 0.0, 8)
    sampled = TextGenerationController._torch_sampling_func(controller, logits, 1.0, 0, 0.0, 8)
    assert greedy.tolist() == [2] * 64
    assert int(sampled.max()) < 5
    route_patches.revert()
    assert TextGenerationController._torch_sampling_func(controller, logits, 1.0, 1, 0.0, 8).tolist() == [6] * 64


def test_the_rest_server_refuses_with_http_errors_before_any_rank_generates(route_patches, monkeypatch):
    pytest.importorskip("flask_restful")
    from megatron.core.inference.text_generation_server import text_generation_server as server

    started = []
    monkeypatch.setattr(server, "send_do_generate", lambda: started.append("told the other ranks"))
    client = server.MegatronServer(types.SimpleNamespace(), argparse.Namespace()).app.test_client()
    refused = {
        "invalid JSON": client.put("/api", data="{not json", content_type="application/json"),
        "too many prompts": client.put("/api", json={"prompts": ["x"] * 129}),
        "prompts not text": client.put("/api", json={"prompts": [1, 2]}),
        # megatron-core answers these with its message and HTTP 200
        "tokens_to_generate not a number": client.put("/api", json={"prompts": ["x"], "tokens_to_generate": "8"}),
        "temperature out of range": client.put("/api", json={"prompts": ["x"], "temperature": 0.0}),
    }
    assert {name: r.status_code for name, r in refused.items()} == {name: 400 for name in refused}
    assert refused["prompts not text"].get_json() == "prompts must be a list of strings"
    assert not started


def test_a_request_longer_than_the_limit_is_a_refusal_on_every_rank():
    from megatron.core.inference.contexts.dynamic_context import MaxSequenceLengthOverflowError
    from werkzeug.exceptions import BadRequest

    def run_mcore_engine(engine, prompts=None, *args, **kwargs):
        engine.scheduler.waiting_request_pool["1"] = "the failed request"
        raise MaxSequenceLengthOverflowError(None, "Maximum allowed sequence length was set to 256 tokens")

    patched = inference._overflow_as_a_refusal(run_mcore_engine)
    engine = types.SimpleNamespace(scheduler=types.SimpleNamespace(active_request_pool={}, waiting_request_pool={}))
    with pytest.raises(BadRequest, match="--inference-max-seq-length") as serving_rank:
        patched(engine, ["a very long prompt"])
    assert serving_rank.value.code == 400 and not engine.scheduler.waiting_request_pool
    with pytest.raises(ValueError, match="256 tokens"):  # what the other ranks' loop catches
        patched(engine)
    assert not engine.scheduler.waiting_request_pool


def test_the_route_lists_its_inference_patches():
    from aquila_npu.megatron_lm import route_plugins

    registry = PatchRegistry()
    route_plugins()["megatron-lm-inference"].aquila_npu_register_patches(registry=registry, device="npu")
    targets = {row["target"] for row in registry.rows()}
    assert "megatron.core.inference.text_generation_server.text_generation_server.MegatronServer.run" in targets
    assert all(row["reason"] and row["owner"] == "megatron-lm-inference" for row in registry.rows())
