"""The Megatron-LM route: unmodified Megatron-LM scripts (``torchrun pretrain_gpt.py --plugin aquila2 ...``) with
aquila-npu's plugins.

* ``startup``: the start-up hook ``aquila_npu-autoload.pth`` imports when ``--plugin`` is on the command line (or a
  parent process of the job set the plugin environment variable);
* ``arguments``: ``--plugin`` / ``--model`` / ``--device`` / kernel and device flags expanded into Megatron-LM's;
* ``layer_spec``: the ``--spec aquila_npu.megatron_lm.layer_spec layer_spec`` entry Megatron-LM's builder imports;
* ``training``: the plugin ``megatron-lm`` (patches and arguments for ``pretrain_gpt.py``);
* ``lora``: LoRA adapters on the model Megatron-LM builds, and its checkpointing kept to one part at a time (the
  base from ``--load``, the adapters saved and resumed with ``--lora-load``);
* ``inference``: the plugin ``megatron-lm-inference`` (the family's tokenizer conventions, the REST server's
  refusals and bind address, for ``tools/run_text_generation_server.py`` and the inference examples);
* ``without_triton``: stand-ins for the Megatron modules that import Triton, on hosts that have none;
* ``tool``: ``python -m aquila_npu.megatron_lm.tool SCRIPT`` runs a Megatron-LM tool script under our patches.

Nothing here imports Megatron at import time: the start-up hook runs before the script has put its own
``megatron`` package on ``sys.path``.
"""


def route_plugins() -> dict:
    """The plugins this route adds to the installed ones, by name (the start-up hook registers them; ``aquila-npu
    plugins --patches`` lists their patches)."""
    from aquila_npu.megatron_lm import inference, training

    return {"megatron-lm": training, "megatron-lm-inference": inference}
