"""Feature capture from nnU-Net U-Nets with forward hooks that clean up after themselves.

Stage names are semantic and indexed by RESOLUTION LEVEL, the same index as nnU-Net's deep-supervision
target list: ``enc{k}`` is the output of encoder stage k (k = 0 full resolution, k = n_stages-1 the
bottleneck) and ``dec{k}`` the decoder stage whose output is at encoder stage k's resolution
(k = 0 .. n_stages-2). The mapping to module paths lives in `stage_module_paths` and nowhere else.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def stage_module_paths(network: nn.Module) -> dict[str, str]:
    """Semantic stage names -> module paths for PlainConvUNet / ResidualEncoderUNet style networks.

    Hooks go on whole stages (nn.Sequential outputs), never on the in-place LeakyReLUs inside them.
    """
    network = unwrap_network(network)
    try:
        n_encoder = len(network.encoder.stages)
        n_decoder = len(network.decoder.stages)
    except AttributeError as e:
        raise TypeError(f"{type(network).__name__} has no encoder.stages / decoder.stages; only nnU-Net's "
                        f"dynamic_network_architectures U-Nets can be hooked by name") from e
    paths = {f"enc{k}": f"encoder.stages.{k}" for k in range(n_encoder)}
    paths.update({f"dec{k}": f"decoder.stages.{n_decoder - 1 - k}" for k in range(n_decoder)})
    return paths


def stage_channels(arch_kwargs: dict) -> dict[str, int]:
    """Output channels of every named stage, from nnU-Net's architecture kwargs (no network needed)."""
    features = list(arch_kwargs["features_per_stage"])
    channels = {f"enc{k}": c for k, c in enumerate(features)}
    channels.update({f"dec{k}": features[k] for k in range(len(features) - 1)})
    return channels


class FeatureRecorder:
    """Records the outputs of named stages of one network during ``with recorder:`` blocks.

    Hooks are registered once at construction and kept; outside the ``with`` block (validation,
    inference, the other network) nothing is stored. ``pop()`` hands the features over and clears,
    so no activation outlives its training step. ``remove()`` (or ``close``) detaches every hook.

    Raises:
        KeyError: a requested stage name does not exist; the message lists the valid names.
    """

    def __init__(self, network: nn.Module, names: Iterable[str]):
        self.network = unwrap_network(network)
        valid = stage_module_paths(self.network)
        self.names = list(dict.fromkeys(names))
        unknown = [n for n in self.names if n not in valid]
        if unknown:
            raise KeyError(f"unknown stage name(s) {unknown} for {type(self.network).__name__}; "
                           f"valid names: {', '.join(valid)}")
        modules = dict(self.network.named_modules())
        self._features: dict[str, torch.Tensor] = {}
        self._active = False
        self._handles = [modules[valid[n]].register_forward_hook(self._hook_for(n)) for n in self.names]

    def _hook_for(self, name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if self._active:
                self._features[name] = output

        return hook

    def __enter__(self) -> "FeatureRecorder":
        if not self._handles and self.names:
            raise RuntimeError("this FeatureRecorder was removed; build a new one")
        self._features.clear()
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def pop(self) -> dict[str, torch.Tensor]:
        """The features recorded in the last ``with`` block, by name; the recorder is emptied."""
        features, self._features = self._features, {}
        missing = [n for n in self.names if n not in features]
        if missing:
            raise RuntimeError(f"stages {missing} produced no output in the recorded forward pass")
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features = {}
        self._active = False

    @property
    def num_hooks(self) -> int:
        return len(self._handles)
