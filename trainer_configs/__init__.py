"""Defaults of each shipped trainer, one JSON per -tr name (shipped as nnunetv2_recokd.trainer_configs)."""
