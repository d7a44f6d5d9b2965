"""hybrid_fc: model-parallel Partial FC heads beside DeepSpeed ZeRO backbones."""
