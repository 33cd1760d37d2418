"""LoRA on the Megatron-LM route (``pretrain_gpt.py --plugin aquila2 --lora-r R ...``): the driver's adapters
(``aquila_npu.lora``) on the model Megatron-LM's builder made, and Megatron-LM's own checkpointing kept to what a
LoRA run needs.

Megatron-LM saves and loads whatever the model's state dicts hold, so the model built here shows them one part at a
time: its adapters (saving, and ``--lora-load``), or its base weights (``--load``). ``load_checkpoint`` becomes two
loads of Megatron-LM's own: the base from ``--load`` (weights only, as ``--finetune`` loads them), then, with
``--lora-load``, the adapters with their optimizer, scheduler and iteration (unless ``--finetune`` /
``--no-load-optim`` say otherwise). The part shown is loaded strictly: a key of it missing, or a key the model lacks,
stops the run with one line.
"""

from __future__ import annotations

import contextlib

from aquila_npu import lora
from aquila_npu.errors import AquilaNpuError

_SHOWN = {"part": "adapters", "splitting": False}  # what the adapted model's state dicts hold now; in a split load


def _in_part(key: str) -> bool:
    return lora.is_adapter_key(key) == (_SHOWN["part"] == "adapters")


@contextlib.contextmanager
def showing(part: str):
    before, _SHOWN["part"] = _SHOWN["part"], part
    try:
        yield
    finally:
        _SHOWN["part"] = before


def adapt(model, args):
    """``model`` (a GPTModel Megatron-LM's builder made) with LoRA adapters when the run asks for them."""
    adapters = getattr(args, "lora_load", None)
    options = lora.options_from_args(args, _saved_args(adapters) if adapters else None)
    if options is None:
        return model
    lora.apply_lora(model, options, args.seed)
    vars(args).update(lora.saved_fields(options))  # Megatron-LM saves its args: the adapters' options go with them
    sharded, plain, load = model.sharded_state_dict, model.state_dict_for_save_checkpoint, model.load_state_dict

    def sharded_state_dict(*a, **kw):
        return {k: v for k, v in sharded(*a, **kw).items() if _in_part(k)}

    def state_dict_for_save_checkpoint(*a, **kw):
        return {k: v for k, v in plain(*a, **kw).items() if _in_part(k)}

    def load_state_dict(state_dict, strict: bool = True):
        given = {k: v for k, v in state_dict.items() if _in_part(k)}
        missing, unexpected = load(given, strict=False)
        missing = [k for k in missing if _in_part(k)]
        what = "LoRA adapters" if _SHOWN["part"] == "adapters" else "base weights"
        if missing or unexpected:
            first = (missing or unexpected)[0]
            raise AquilaNpuError(f"the checkpoint's {what} do not fit this model ({len(missing)} missing, "
                                 f"{len(unexpected)} unknown; first: {first}); check --model, the LoRA flags, and "
                                 f"that --load is the base and --lora-load a LoRA run's --save folder")
        return missing, unexpected

    model.sharded_state_dict = sharded_state_dict
    model.state_dict_for_save_checkpoint = state_dict_for_save_checkpoint
    model.load_state_dict = load_state_dict
    model.aquila_npu_lora = options
    return model


def _saved_args(path: str):
    from aquila_npu.training.checkpointing import saved_args

    return saved_args(path, "--lora-load")


def load_checkpoint_in_parts(original):
    def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg="load", strict=True, **kwargs):
        from megatron.core.utils import unwrap_model

        # the training module's imported copy may be this wrapper around the checkpointing module's: split once
        if load_arg != "load" or _SHOWN.get("splitting") or not getattr(unwrap_model(ddp_model)[0],
                                                                         "aquila_npu_lora", None):
            return original(ddp_model, optimizer, opt_param_scheduler, load_arg, strict, **kwargs)
        with _splitting():
            return _load_in_parts(original, ddp_model, optimizer, opt_param_scheduler, strict, **kwargs)

    return load_checkpoint


@contextlib.contextmanager
def _splitting():
    _SHOWN["splitting"] = True
    try:
        yield
    finally:
        _SHOWN["splitting"] = False


def _load_in_parts(original, ddp_model, optimizer, opt_param_scheduler, strict, **kwargs):
    """The base from --load (weights only), then the adapters from --lora-load; (iteration, flops) of the latter."""
    from megatron.training import get_args

    args = get_args()
    weights_only = {"finetune": True, "no_load_optim": True, "no_load_rng": True}
    before = {k: getattr(args, k) for k in weights_only}
    vars(args).update(weights_only)
    try:
        with showing("base"):
            original(ddp_model, optimizer, opt_param_scheduler, "load", strict, **kwargs)
    finally:
        vars(args).update(before)
    if not args.lora_load:
        return 0, 0
    with showing("adapters"):
        return original(ddp_model, optimizer, opt_param_scheduler, "lora_load", strict, **kwargs)
