"""``--spec aquila_npu.megatron_lm.layer_spec layer_spec``: the layer spec Megatron-LM's ``gpt_builder`` imports.

Megatron-LM reads the spec as a plain module attribute (``vars(module)[name]``), so it is built when this module is
first imported, inside the training process, for the device the start-up hook selected and the job's kernel flags.
"""

from aquila_npu import layers, plugin_manager

layer_spec = layers.layer_spec(plugin_manager.active_kernels())
