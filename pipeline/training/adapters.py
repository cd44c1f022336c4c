"""The adapters training adds to the pipe, and everything it changes there, to put
back afterwards: adapters already in the pipe step aside, the base model is frozen,
fresh peft adapters (LoRA, LoHa, LoKr) are injected with fp32 weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pipeline.contract.jobs import TrainSpec
from pipeline.families import of_pipe

ADAPTER = "sdbot_train"


TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


TEXT_LR_RATIO = 0.1  # kohya: 1e-4 for the UNet, 1e-5 for the text encoder


@contextmanager
def quiet(pipe: Any) -> Iterator[None]:
    """No tqdm bars from the pipe while we train; the caller's setting comes back after."""
    had = "_progress_bar_config" in pipe.__dict__
    before = pipe.__dict__.get("_progress_bar_config")
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = before
        else:
            del pipe._progress_bar_config


class PipeState:
    """Everything training changes on the pipe's models, to put back afterwards.
    The UNet comes first."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.models = models
        self.training = [m.training for m in models]
        self.requires_grad = [(p, p.requires_grad) for m in models for p in m.parameters()]
        self.peft_config = [m.__dict__.get("peft_config", _MISSING) for m in models]
        self.peft_config_items = [
            dict(c) if isinstance(c, dict) else None for c in self.peft_config
        ]
        self.unet_checkpointing = models[0].is_gradient_checkpointing

    @classmethod
    def capture(cls, pipe: Any) -> PipeState:
        return cls(of_pipe(pipe).models(pipe))

    def restore(self, pipe: Any) -> None:
        for model, training, config, items in zip(
            self.models, self.training, self.peft_config, self.peft_config_items, strict=True
        ):
            model.train(training)
            if config is _MISSING:
                model.__dict__.pop("peft_config", None)
                continue
            if items is not None:
                config.clear()  # the same dict object, with exactly its old entries
                config.update(items)
            model.peft_config = config
        denoiser = of_pipe(pipe).denoiser(pipe)
        if denoiser.is_gradient_checkpointing and not self.unet_checkpointing:
            denoiser.disable_gradient_checkpointing()
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)


_MISSING = object()


def trainable_models(pipe: Any, *, train_text: bool) -> list[tuple[str, torch.nn.Module]]:
    """(kind, model) pairs that get an adapter."""
    denoiser, *encoders = of_pipe(pipe).adaptable(pipe)
    models = [("unet", denoiser[1])]
    if train_text:
        models += [("text", encoder) for _, encoder in encoders]
    return models


def set_aside_adapters(pipe: Any) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Swap every peft layer already in the pipe for its base layer; returns
    (parent, attribute, layer) to put back. The base layers are the very modules the
    set-aside layers wrap, so putting them back restores the pipe exactly."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    moved: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def walk(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                moved.append((parent, name, child))
                setattr(parent, name, child.get_base_layer())
            else:
                walk(child)

    for _, model in trainable_models(pipe, train_text=True):
        walk(model)
    return moved


def freeze(pipe: Any) -> None:
    for model in of_pipe(pipe).models(pipe):
        model.requires_grad_(False)


def _adapter_config(spec: TrainSpec, targets: list[str] | str) -> Any:
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if spec.method == "loha":
        return LoHaConfig(r=spec.rank, alpha=spec.alpha, target_modules=targets)
    if spec.method == "lokr":
        return LoKrConfig(r=spec.rank, alpha=spec.alpha, target_modules=targets)
    # Gaussian A (and zero B), as the diffusers example initialises it.
    return LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=targets
    )


def add_adapters(pipe: Any, spec: TrainSpec) -> list[Any]:
    """Inject fresh adapters in place; returns the peft tuners that can unload them."""
    from peft import LoHaModel, LoKrModel, LoraModel

    tuner_class = {"lora": LoraModel, "loha": LoHaModel, "lokr": LoKrModel}[spec.method]
    tuners = []
    # Adapter initialisation is part of the run's seed; the caller's RNG is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for kind, model in trainable_models(pipe, train_text=spec.train_text_encoder):
            # The set-aside adapters' configs must not meet ours (PipeState puts them back).
            model.__dict__.pop("peft_config", None)
            targets = _denoiser_targets(pipe) if kind == "unet" else TEXT_TARGETS
            tuners.append(tuner_class(model, _adapter_config(spec, targets), ADAPTER))
    for _, model in trainable_models(pipe, train_text=spec.train_text_encoder):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # fp32 master weights under autocast
    return tuners


def _denoiser_targets(pipe: Any) -> list[str] | str:
    """The family's target layers (a pattern stays a pattern: peft full-matches it)."""
    targets = of_pipe(pipe).training_targets
    return targets if isinstance(targets, str) else list(targets)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(pipe: Any, spec: TrainSpec) -> list[dict[str, Any]]:
    groups = []
    for kind, model in trainable_models(pipe, train_text=spec.train_text_encoder):
        lr = spec.learning_rate * (1.0 if kind == "unet" else TEXT_LR_RATIO)
        groups.append({"params": [p for _, p in trainable(model)], "lr": lr})
    return groups


def set_training(pipe: Any, spec: TrainSpec, training: bool) -> None:
    for _, model in trainable_models(pipe, train_text=spec.train_text_encoder):
        model.train(training)
