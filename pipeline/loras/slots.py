"""LoRA slots: denoiser LoRAs that never change the compiled graph (`[loras] slots`).

The denoiser is the family's (`Family.denoiser`): the SD UNets, and the transformers of
the flow families (Flux.1: every Linear, its fused qkv / linear1 LoRA layers each
module's rows of the fused up factor); "UNet" below means that denoiser.

`install(unet, ...)` (called by `pipeline.generate.compiled.prepare` before
`torch.compile`) gives every Linear and Conv2d of the UNet a fixed-shape low-rank side
path with preallocated buffers, S slots at a padded rank R:

    y = base(x) + ((x · downᵀ) ⊙ scale[row]) · upᵀ

down is [S·R, in] (a Conv2d: a k×k conv [S·R, in, k, k] with the layer's stride and
padding), up is [out, S·R] (a 1×1 conv), and `scale` is one [rows, S·R] tensor shared
by every layer: row r's weight for each slot, repeated over the slot's R ranks (0 for
an empty slot, for padding ranks, and at rest). Every shape is fixed, so the graph
compiled (and warmed) without LoRAs is the one that runs one LoRA, another one next
job, or a batch of four jobs with four different LoRAs: switching is a `copy_` into a
slot and one `copy_` of the scale rows per pipeline call, never a new tensor inside a
layer's forward. The dense form over slots is the gathered batched matmul of Punica /
S-LoRA with the gather done by the zero weights: on a UNet the rank-S·R side matmuls
cost less than the gathers would (BENCHMARKS.md, issue 13).

What goes in a slot (exactly, no approximation): the `lora` algorithm (kohya LoRA and
LoCon, DyLoRA, diffusers/peft files, LoCon-Tucker folded into a k×k down conv) on the
UNet, at rank ≤ R, without DoRA or a bias of its own. Anything else a job's LoRAs carry
on the UNet (LoHa, LoKr, DoRA, full, IA3, OFT/BOFT, GLoRA, norm layers, BFL's norm
scales and lora_B biases, a rank above R), more distinct
UNet LoRAs in one call than S, or more rows than the buffers hold: that call runs
today's exact eager path (`pipeline.loras.batch`) instead — nothing is approximated
or left out (docs/DECISIONS.md). Text-encoder layers always run on that eager path
(the encoders run once per job, uncompiled).

Rows: the UNet sees samples in order, repeated for CFG (negatives then positives), so
row r belongs to sample r mod n with or without CFG; every row of the buffer is filled
that way, so the fill does not need to know whether the pipeline uses CFG.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.loras.formats import LayerDelta, _scale

log = logging.getLogger(__name__)

SCALE_BUFFER = "lora_slot_scale"


class SlotLinear(nn.Linear):
    """nn.Linear with the slot side path (the class a UNet Linear gets at install)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        rows = x.shape[0]
        scale = self.lora_slot_scale
        if rows > scale.shape[0]:  # static under torch.compile(dynamic=False)
            raise RuntimeError(f"LoRA slots hold {scale.shape[0]} rows; this call has {rows}")
        h = F.linear(x, self.lora_slot_down)
        h = h * scale[:rows].view(rows, *([1] * (h.dim() - 2)), -1)
        return y + F.linear(h, self.lora_slot_up)


class SlotConv2d(nn.Conv2d):
    """nn.Conv2d with the slot side path: a k×k down conv, then a 1×1 up conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        rows = x.shape[0]
        scale = self.lora_slot_scale
        if rows > scale.shape[0]:
            raise RuntimeError(f"LoRA slots hold {scale.shape[0]} rows; this call has {rows}")
        h = F.conv2d(x, self.lora_slot_down, None, self.stride, self.padding, self.dilation)
        h = h * scale[:rows].view(rows, -1, 1, 1)
        return y + F.conv2d(h, self.lora_slot_up)


_SLOT_CLASSES = {nn.Linear: SlotLinear, nn.Conv2d: SlotConv2d}


def _targets(unet: nn.Module) -> dict[str, nn.Module]:
    """Every plain Linear / Conv2d of the UNet: a superset of what kohya sd-scripts
    (Transformer2DModel's Linears and 1×1 convs; with conv_dim the ResnetBlock2D,
    Downsample2D and Upsample2D convs) and LyCORIS's full preset (also conv_in,
    conv_out, time_embedding) target."""
    out = {}
    for path, module in unet.named_modules():
        cls = type(module)
        if cls is nn.Conv2d and (module.groups != 1 or module.padding_mode != "zeros"):
            continue
        if cls in _SLOT_CLASSES:
            out[path] = module
    return out


@dataclass
class SlotStats:
    calls: int = 0  # pipeline calls whose UNet LoRAs ran in slots
    eager: int = 0  # pipeline calls with UNet LoRAs that ran on the eager path
    fills: int = 0  # LoRAs copied into a slot
    hits: int = 0  # LoRAs found in a slot already
    reasons: dict[str, int] = field(default_factory=dict)  # why calls ran eager


class SlotBank:
    """The slots of one UNet: which adapter is in which slot (LRU), and the scale rows."""

    def __init__(self, unet: nn.Module, layers: dict[str, nn.Module], slots: int, rank: int):
        self.denoiser = unet
        self.layers = layers
        self.slots = slots
        self.rank = rank
        self.scale: torch.Tensor = next(iter(layers.values())).lora_slot_scale
        self.rows = self.scale.shape[0]
        self._lru: OrderedDict[str, int] = OrderedDict()  # adapter → slot, least recent first
        self._filled: dict[int, list[str]] = {}  # slot → layer paths holding data
        self.stats = SlotStats()

    # -- what fits -----------------------------------------------------------------------

    def unfit(self, layers: dict[str, LayerDelta]) -> str | None:
        """Why this adapter's UNet layers cannot go in a slot (None: they can)."""
        for path, delta in layers.items():
            if path not in self.layers:
                return f"layer {path} has no slot"
            if delta.algo != "lora":
                return delta.algo
            if "dora_scale" in delta.params:
                return "dora"
            if "lora_up.bias" in delta.params:  # peft's lora_bias: a bias change
                return "bias"
            rank = _fused_part(delta)[0].shape[0]
            if rank > self.rank:
                return f"rank {rank} > max_rank {self.rank}"
        return None

    # -- filling -------------------------------------------------------------------------

    def ensure(self, name: str, layers: dict[str, LayerDelta], keep: set[str]) -> int:
        """The slot holding `name`, copying it into a free (or least recently used) one."""
        if name in self._lru:
            self._lru.move_to_end(name)
            self.stats.hits += 1
            return self._lru[name]
        used = set(self._lru.values())
        free = [s for s in range(self.slots) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(n for n in self._lru if n not in keep)
            slot = self._lru.pop(victim)
        self._fill(slot, layers)
        self._lru[name] = slot
        self.stats.fills += 1
        return slot

    @torch.no_grad()
    def _fill(self, slot: int, layers: dict[str, LayerDelta]) -> None:
        lo, hi = slot * self.rank, (slot + 1) * self.rank
        for path in self._filled.pop(slot, []):
            module = self.layers[path]
            module.lora_slot_down[lo:hi].zero_()
            module.lora_slot_up[:, lo:hi].zero_()
        for path, delta in layers.items():
            module = self.layers[path]
            down, up = slot_factors(delta, module)
            rank = down.shape[0]
            module.lora_slot_down[lo : lo + rank].copy_(down)
            module.lora_slot_up[:, lo : lo + rank].copy_(up)
        self._filled[slot] = list(layers)

    @torch.no_grad()
    def set_rows(self, per_sample: Sequence[dict[str, float]]) -> None:
        """Row r gets sample (r mod n)'s weight for each slot; one copy to the device."""
        n = len(per_sample)
        weights = torch.zeros(n, self.slots)
        for i, sample in enumerate(per_sample):
            for name, weight in sample.items():
                if name in self._lru:
                    weights[i, self._lru[name]] += weight
        rows = weights.repeat(-(-self.rows // n), 1)[: self.rows]
        self.scale.copy_(rows.repeat_interleave(self.rank, dim=1), non_blocking=True)

    @torch.no_grad()
    def clear_rows(self) -> None:
        self.scale.zero_()


def _fused_part(delta: LayerDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one module of a layer; of a fused layer of the file (Flux.1's qkv,
    linear1), our rows of up, and only the ranks whose up is non-zero on them: sd-scripts'
    `split_qkv` (and our Flux.1 export) give each part its own r columns of a
    block-diagonal up, so a part is rank r, not n·r. ΔW is the same (the ranks left out
    add zeros here)."""
    down, up = delta.params["lora_down.weight"], delta.params["lora_up.weight"]
    if delta.fused is None:
        return down, up
    up = up.flatten(1)
    up = torch.cat([up[start:end] for start, end in delta.fused[0]])
    used = up.ne(0).any(dim=0)
    if used.all():
        return down, up
    return down[used], up[:, used]


def slot_factors(delta: LayerDelta, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of a `lora` layer in the slot's shapes, alpha/rank folded into up, so
    up · down = ΔW at weight 1. LoCon-Tucker's mid conv is folded into the down conv."""
    p = {k: v.float() for k, v in delta.params.items()}
    scale = _scale({**p, **delta.scalars}, p["lora_down.weight"].shape[0])  # the file's rank
    down, up = _fused_part(delta)
    down, up = down.float(), up.float()
    rank = down.shape[0]
    out_features = module.weight.shape[0]
    up = up.reshape(out_features, rank) * scale
    if isinstance(module, nn.Conv2d):
        if "lora_mid.weight" in p:  # mid [r, r, k, k] after a 1×1 down [r, in]
            down = torch.einsum("o i h w, i c -> o c h w", p["lora_mid.weight"], down.flatten(1))
        else:
            down = down.reshape(rank, *module.weight.shape[1:])
        return down.to(module.weight.dtype), up.reshape(out_features, rank, 1, 1).to(
            module.weight.dtype
        )
    return down.flatten(1).to(module.weight.dtype), up.to(module.weight.dtype)


def install(unet: nn.Module, *, slots: int, max_rank: int, rows: int) -> SlotBank | None:
    """Give every UNet Linear/Conv2d its slot buffers (zero); returns the bank (None when
    `slots` is 0). Call before `torch.compile`: the buffers are the graph's inputs."""
    found = getattr(unet, "_lora_slots", None)
    if found is not None or slots <= 0:
        return found
    layers = _targets(unet)
    if not layers:
        return None
    width = slots * max_rank
    param = next(unet.parameters())
    scale = torch.zeros(rows, width, device=param.device, dtype=param.dtype)
    for module in layers.values():
        weight = module.weight
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        if isinstance(module, nn.Conv2d):
            down = torch.zeros(width, *weight.shape[1:], **kwargs)
            up = torch.zeros(weight.shape[0], width, 1, 1, **kwargs)
            if weight.is_contiguous(memory_format=torch.channels_last):
                down = down.contiguous(memory_format=torch.channels_last)
                up = up.contiguous(memory_format=torch.channels_last)
        else:
            down = torch.zeros(width, weight.shape[1], **kwargs)
            up = torch.zeros(weight.shape[0], width, **kwargs)
        module.register_buffer("lora_slot_down", down, persistent=False)
        module.register_buffer("lora_slot_up", up, persistent=False)
        module.register_buffer(SCALE_BUFFER, scale, persistent=False)
        module.__class__ = _SLOT_CLASSES[type(module)]
    bank = SlotBank(unet, layers, slots, max_rank)
    unet._lora_slots = bank
    nbytes = sum(
        m.lora_slot_down.numel() * m.lora_slot_down.element_size()
        + m.lora_slot_up.numel() * m.lora_slot_up.element_size()
        for m in layers.values()
    )
    log.info(
        "LoRA slots: %d layers, %d slots at rank %d, %d rows, %.1f MB",
        len(layers),
        slots,
        max_rank,
        rows,
        nbytes / 2**20,
    )
    return bank


def uninstall(unet: nn.Module) -> None:
    """Put the plain Linear/Conv2d classes back and drop the buffers (tests, benchmarks)."""
    bank = getattr(unet, "_lora_slots", None)
    if bank is None:
        return
    for module in bank.layers.values():
        module.__class__ = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
        for name in ("lora_slot_down", "lora_slot_up", SCALE_BUFFER):
            del module._buffers[name]
    del unet._lora_slots


def bank_of(unet: Any) -> SlotBank | None:
    return getattr(unet, "_lora_slots", None)
