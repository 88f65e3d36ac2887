"""Integrations with the training stack: ranks, FSDP / DDP / ZeRO-3 helpers for FuRA models (``distributed.py``)."""
