"""The student: nnU-Net's own planned architecture with every stage made narrower.

ReCo-KD (arXiv 2601.08301) keeps the teacher's depth, kernels and strides and divides the channels of
each stage: C' = max(C_min, C / 2^t); its main setting is width 1/4 with C_min = 8. Because
nnUNetv2_predict rebuilds a network from the trainer class and the model folder's plans.json alone,
the width a student was trained with is written into that plans.json (key ``recokd_student`` of the
configuration) and read back here; the class defaults only apply when the key is absent.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any, Optional

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

PLANS_KEY = "recokd_student"


def scaled_features(features_per_stage: list[int], width: float, min_channels: int) -> list[int]:
    """Channels per stage of the student: max(min_channels, round(C * width)), never above the teacher's C.

    Raises:
        ValueError: width outside (0, 1] or a stage that would be left without channels.
    """
    if not 0 < width <= 1:
        raise ValueError(f"student width must be in (0, 1], got {width}")
    scaled = [min(c, max(min_channels, int(round(c * width)))) for c in features_per_stage]
    empty = [i for i, c in enumerate(scaled) if c < 1]
    if empty:
        raise ValueError(f"student width {width} with min_channels {min_channels} leaves stage(s) {empty} of "
                         f"{features_per_stage} without channels; raise student_width or student_min_channels")
    return scaled


def student_spec(configuration: dict[str, Any], default_width: float, default_min_channels: int) -> dict[str, Any]:
    """The (width, min_channels) recorded in a plans configuration, else the given defaults, and the dataset
    channels the student reads (input_channels; None: every channel of its dataset.json)."""
    spec = configuration.get(PLANS_KEY) or {}
    return {"width": float(spec.get("width", default_width)),
            "min_channels": int(spec.get("min_channels", default_min_channels)),
            "input_channels": spec.get("input_channels")}


def student_arch_kwargs(arch_kwargs: dict[str, Any], width: float, min_channels: int) -> dict[str, Any]:
    """A copy of nnU-Net's network_arch_init_kwargs with features_per_stage scaled."""
    kwargs = deepcopy(arch_kwargs)  # the ConfigurationManager is cached and shared: never edit in place
    kwargs["features_per_stage"] = scaled_features(list(kwargs["features_per_stage"]), width, min_channels)
    return kwargs


def build_student_network(configuration_manager, num_input_channels: int, num_output_channels: int,
                          enable_deep_supervision: bool, width: float, min_channels: int,
                          allow_init: bool = True) -> nn.Module:
    """Build the narrow student from nnU-Net's plans (PlainConvUNet, ResidualEncoderUNet, ...)."""
    return get_network_from_plans(
        configuration_manager.network_arch_class_name,
        student_arch_kwargs(configuration_manager.network_arch_init_kwargs, width, min_channels),
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        allow_init=allow_init,
        deep_supervision=enable_deep_supervision,
    )


def student_network_from_plans(configuration_manager, num_input_channels: int, num_output_channels: int,
                               enable_deep_supervision: bool, default_width: float,
                               default_min_channels: int) -> nn.Module:
    """The student a model folder's plans describe (what our trainers' build_network_architecture returns).

    num_input_channels counts the dataset's channels in training, where the student reads the recorded
    input_channels of them; in prediction the student's model folder lists only its channels, so both agree."""
    spec = student_spec(configuration_manager.configuration, default_width, default_min_channels)
    n_inputs = len(spec["input_channels"]) if spec["input_channels"] else num_input_channels
    return build_student_network(configuration_manager, n_inputs, num_output_channels, enable_deep_supervision,
                                 spec["width"], spec["min_channels"])


def recorded_student_spec(configuration: dict[str, Any]) -> bool:
    """Whether the plans configuration records the student's width and minimum channels (our trainers write
    both into every model folder's plans.json), so the student can be built without its trainer class."""
    spec = configuration.get(PLANS_KEY) or {}
    return "width" in spec and "min_channels" in spec


def count_parameters(network: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared modules such as decoder.encoder are counted once)."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad or not trainable_only)


def record_student_spec(plans: dict[str, Any], configuration_manager, configuration: str,
                        width: float, min_channels: int, extra: Optional[dict[str, Any]] = None) -> None:
    """Write the student's width into the plans (saved as the model folder's plans.json) and the cached manager."""
    spec = {"width": width, "min_channels": min_channels, **(extra or {})}
    plans["configurations"][configuration][PLANS_KEY] = spec
    configuration_manager.configuration[PLANS_KEY] = spec
