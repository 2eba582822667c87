"""Optimizer kinds: AdamW, and PEFT's LoRA+, LoRA-FA and Riemannian-preconditioned optimizers, one module
per kind (``OPTIMIZER``), loaded by name by the registry (:mod:`fimlora.methods`)."""
