"""The Megatron-LM route: unmodified Megatron-LM scripts (``torchrun pretrain_gpt.py --plugin aquila2 ...``) with
aquila-npu's plugins.

* ``startup``: the start-up hook ``aquila_npu-autoload.pth`` imports when ``--plugin`` is on the command line (or a
  parent process of the job set the plugin environment variable);
* ``arguments``: ``--plugin`` / ``--model`` / ``--device`` / kernel and device flags expanded into Megatron-LM's;
* ``layer_spec``: the ``--spec aquila_npu.megatron_lm.layer_spec layer_spec`` entry Megatron-LM's builder imports;
* ``training``: the plugin ``megatron-lm`` (patches and arguments for ``pretrain_gpt.py``);
* ``tool``: ``python -m aquila_npu.megatron_lm.tool SCRIPT`` runs a Megatron-LM tool script under our patches.

Nothing here imports Megatron at import time: the start-up hook runs before the script has put its own
``megatron`` package on ``sys.path``.
"""
