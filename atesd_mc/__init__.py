"""atesd-mc: Adaptive Teacher Exposure Self-Distillation on megatron-core."""
__version__ = "0.1.0"
