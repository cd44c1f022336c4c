"""ControlNets on a worker: loaded once, kept in an LRU cache by size, stacked per job.

A job's units run through diffusers' ControlNet pipelines (the family's per mode:
`Family.control_pipelines`), derived from the loaded model with `from_pipe` so the base
weights are shared; the family says which ControlNet class it loads and how its nets are
stacked and called (Z-Image, Qwen-Image: one net, diffusers' arguments). On the UNet
families several units stack as a `MultiControlNetModel` whose outputs add up; the
stack also applies A1111's control modes per unit:

- Balanced: the ControlNet's residuals as they are.
- My prompt is more important: residual i of n scaled by 0.825^(n-1-i) (the extension's
  "soft injection": deep, coarse layers keep their weight, shallow ones fade).
- ControlNet is more important: soft injection, and only the conditional half of the
  CFG batch gets the control (the extension's "cfg injection"), so the prompt's pull is
  weaker than the control's.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from pipeline.contract.families import label as family_label
from pipeline.contract.jobs import JobError

log = logging.getLogger(__name__)

SOFT_INJECTION = 0.825


class ControlStack(MultiControlNetModel):
    """MultiControlNetModel with a control mode per unit (see the module docstring)."""

    modes: list[str]
    cfg: bool

    def forward(  # type: ignore[override]
        self,
        sample,
        timestep,
        encoder_hidden_states,
        controlnet_cond,
        conditioning_scale,
        class_labels=None,
        timestep_cond=None,
        attention_mask=None,
        added_cond_kwargs=None,
        cross_attention_kwargs=None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ):
        down_total, mid_total = None, None
        modes = getattr(self, "modes", ["Balanced"] * len(self.nets))
        for image, scale, net, mode in zip(controlnet_cond, conditioning_scale, self.nets, modes):
            down, mid = net(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=scale,
                class_labels=class_labels,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
            if mode != "Balanced":
                n = len(down) + 1
                down = [d * SOFT_INJECTION ** (n - 1 - i) for i, d in enumerate(down)]
            if mode == "ControlNet is more important" and getattr(self, "cfg", False):
                # diffusers orders the CFG batch [unconditional, conditional]; under prompt
                # editing / AND the rows are the scheduled UNet's (pipeline.control.scheduled).
                mark = torch.ones(sample.shape[0], 1, 1, 1, dtype=mid.dtype, device=mid.device)
                uncond = getattr(self, "uncond_rows", None)
                if uncond is None:
                    mark[: sample.shape[0] // 2] = 0
                else:
                    mark[uncond.to(mark.device)] = 0
                down = [d * mark for d in down]
                mid = mid * mark
            if down_total is None:
                down_total, mid_total = list(down), mid
            else:
                down_total = [a + b for a, b in zip(down_total, down)]
                mid_total = mid_total + mid
        return down_total, mid_total


def control_pipeline(base_pipe: Any, cls: Any, stack: Any) -> Any:
    """A ControlNet pipeline of class `cls` (the family's for the mode) sharing
    `base_pipe`'s modules (no copy of the weights)."""
    pipe = cls.from_pipe(base_pipe, controlnet=stack)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def file_hash(source: str) -> str:
    """sd-webui-controlnet's `[hash]`: first 8 hex of the weights file's sha256."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        if not files:
            return hashlib.sha256(source.encode()).hexdigest()[:8]
        path = files[0]
    elif not path.exists():
        return hashlib.sha256(source.encode()).hexdigest()[:8]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]


class ControlNetCache:
    """The configured ControlNets of one worker, loaded on first use, least recently
    used evicted when their total size passes `max_bytes` (as the LoRA cache does)."""

    def __init__(self, config: Any, device: str, dtype: Any, max_bytes: int | None = None):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.max_bytes = max_bytes if max_bytes is not None else config.control.cache_mb * 2**20
        self._nets: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._hashes: dict[str, str] = {}
        self.loads = 0  # how many times a ControlNet was read from disk

    def get(self, name: str, unet: Any, family: str) -> Any:
        """The unit's ControlNet for a model of `family` whose denoiser is `unet` (a
        UNet, or the flow families' transformer)."""
        entry = self.config.controlnets.get(name)
        if entry is None:
            names = ", ".join(self.config.controlnets) or "none"
            raise JobError(f"unknown ControlNet unit '{name}'; configured units: {names}")
        if entry.family != family:
            raise JobError(
                f"ControlNet '{name}' is for {family_label(entry.family)} but the model is "
                f"{family_label(family)}; pick a {family_label(family)} unit"
            )
        if name in self._nets:
            self._nets.move_to_end(name)
            net = self._nets[name][0]
        else:
            net = self._load(entry, unet, family)
            size = sum(p.numel() * p.element_size() for p in net.parameters())
            self._nets[name] = (net, size)
            self._evict()
        _check_fits(name, net, unet, family)
        return net

    def model_label(self, name: str) -> str:
        """`name [hash8]`, as sd-webui-controlnet shows a model."""
        entry = self.config.controlnets[name]
        if name not in self._hashes:
            self._hashes[name] = file_hash(entry.source)
        return f"{name} [{self._hashes[name]}]"

    def _evict(self) -> None:
        while len(self._nets) > 1 and sum(s for _, s in self._nets.values()) > self.max_bytes:
            evicted, _ = self._nets.popitem(last=False)
            log.info("ControlNet %s evicted from the cache", evicted)

    def _load(self, entry: Any, unet: Any, family: str) -> Any:
        import diffusers

        from pipeline.control.controlnet_file import load_controlnet_file
        from pipeline.families import family as family_of

        kind = family_of(family)
        source = entry.source
        path = Path(source)
        single = path.suffix in (".safetensors", ".ckpt", ".pth", ".bin") and path.is_file()
        if single and not kind.controlnet_single_files:
            raise JobError(
                f"ControlNet '{entry.name}' is one file; {kind.label} ControlNets load from a "
                "diffusers folder or Hub id: give its folder as the unit's source"
            )
        self.loads += 1
        try:
            if single:
                # Offline: the configuration is derived from the file and the base model.
                net = load_controlnet_file(path, self.dtype, unet.config, entry.name)
            else:
                cls = getattr(diffusers, kind.controlnet_class)
                net = cls.from_pretrained(source, torch_dtype=self.dtype)
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for bad files
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise JobError(
                f"ControlNet '{entry.name}' could not be loaded from {source} "
                f"({type(exc).__name__}{': ' + first if first else ''})"
            ) from None
        net.to(self.device)
        net.eval()
        return net


def _check_fits(name: str, net: Any, unet: Any, family: str) -> None:
    """A ControlNet of another model (a width, SDXL's time embedding, a layout the family
    reads: `Family.controlnet_fits`): refuse it by name instead of failing inside."""
    from pipeline.families import family as family_of

    if not family_of(family).controlnet_fits(net, unet):
        raise JobError(
            f"ControlNet '{name}' does not fit this model (it was made for another base "
            "model or family); pick a unit made for this model's family"
        )


def stack_units(family: Any, nets: list[Any], modes: list[str], cfg: bool) -> Any:
    """What the family's ControlNet pipeline takes for a job's nets: the family's own
    stacking (Qwen-Image's multi-ControlNet, Z-Image's one net), else ours."""
    stacked = family.stack_controlnets(nets)
    return stacked if stacked is not None else make_stack(nets, modes, cfg)


def make_stack(nets: list[Any], modes: list[str], cfg: bool) -> ControlStack:
    stack = ControlStack(nets)
    stack.modes = list(modes)
    stack.cfg = cfg
    return stack
