"""Adapter kinds: how a rank pattern becomes trainable modules (PEFT's LoRA, DoRA, VeRA, PiSSA, OLoRA,
LoRA-GA, rsLoRA, GoRA's initialisation; our Delta-LoRA and HydraLoRA; full fine-tuning), one module per
kind (``ADAPTER``), loaded by name by the registry (:mod:`fimlora.methods`)."""
