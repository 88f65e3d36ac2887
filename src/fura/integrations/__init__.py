"""Integrations with the training stack: ranks, FSDP / DDP / ZeRO-3 helpers for FuRA models (``distributed.py``), and
the weight sync to an inference engine without a second copy (``weight_sync.py``; TRL's vLLM sync: ``trl_sync.py``)."""
