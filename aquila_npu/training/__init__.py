"""Pretraining and fine-tuning on megatron-core: ``arguments`` (Megatron-LM's flags), ``data`` (GPTDataset and the
instruction datasets), ``checkpointing`` (torch_dist and per-rank torch), ``loop`` (the driver)."""
