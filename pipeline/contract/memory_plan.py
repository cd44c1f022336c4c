"""The memory plan: how a model's parts are held on a card so that it fits. Pure, no torch.

Input: each component's parameter count (`weight_sizes.ComponentSize`, read from the
files' headers or the family's published table), the card (total and free memory, or
the RAM of a CPU worker) and the largest job the server allows. Output: a placement per
component, an estimated peak and a one-line reason. Plans are tried from the cheapest
(everything resident, nothing lost) to the slowest (every layer streamed from RAM); the
first that fits wins, so more memory never gives a worse plan. `[models.NAME] memory`
picks the denoiser's mode instead ("auto" tries them all).

The estimate per phase (encode, denoise, decode) is the weights on the device then plus
that phase's activations; the peak is the largest phase. Activations are a per-family
constant × tokens × width (docs/DECISIONS.md, issue 26; checked against measured peaks
in BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.contract.devices import DeviceError

# The families' torch-free half (issue 20 moves it to pipeline.contract.families): the one
# place this module and pipeline/models/memory.py and the doctor reach it.
from pipeline.contract.families import ModelError, detect_family  # noqa: F401 - re-exported
from pipeline.contract.families.memory import FAMILY_MEMORY, FamilyMemory, family_memory  # noqa: F401
from pipeline.contract.families.weight_sizes import ComponentSize

GiB = 1024**3

# What `[models.NAME] memory` may say: "auto" or one of the denoiser modes below.
MODES = ("full", "fp8", "offload", "fp8-offload", "group", "sequential")
MEMORY_SETTINGS = ("auto", *MODES)

# (denoiser mode, text encoders) from the cheapest plan to the slowest. Text encoders:
# "device" = resident; "offload" = moved in to encode and out after; "cpu" = encode on the CPU.
GPU_LADDER = (
    ("full", "device"),
    ("full", "offload"),
    ("fp8", "device"),
    ("fp8", "offload"),
    ("offload", "offload"),
    ("fp8-offload", "offload"),
    ("group", "offload"),
    ("offload", "cpu"),
    ("fp8-offload", "cpu"),
    ("group", "cpu"),
    ("sequential", "sequential"),
)
CPU_LADDER = (("full", "device"), ("fp8", "device"))  # offloading to RAM saves no RAM

# Cards people own (GiB), for "the smallest card that would do".
CARD_SIZES = (8, 12, 16, 24, 32, 40, 48, 80, 96, 141)

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Card:
    """Where a worker runs: a GPU (its total and free memory) or the CPU (RAM)."""

    name: str  # "NVIDIA GeForce RTX 4090", "CPU"
    total: int  # bytes
    free: int  # bytes this worker may use now
    kind: str = "cuda"  # cuda | cpu
    compute_dtype: str = "bf16"  # bf16 | fp16 | fp32 (the worker's dtype)
    host_ram: int = 0  # RAM for offloaded weights, bytes; 0 = not checked

    @property
    def budget(self) -> int:
        """What a plan may use: free memory less a margin for the allocator's
        fragmentation and what torch keeps besides tensors."""
        if self.kind == "cpu":
            return max(self.free - GiB // 2, 0)
        return max(self.free - GiB // 2 - self.total // 20, 0)


@dataclass(frozen=True)
class Jobs:
    """The largest work the server allows one call (from `[limits]` and `[workers]`)."""

    image_pixels: int  # the largest image: limits.max_pixels
    call_pixels: int  # the largest call: max(workers.max_batch_pixels, max_count × max_pixels)
    vae_tiling_above: int = 1024 * 1024  # the model's configured threshold


@dataclass(frozen=True)
class Placement:
    component: str  # unet, transformer, text_encoder…, vae
    where: str  # device | offload | group | sequential | cpu
    weights: str  # bf16 | fp16 | fp32 | fp8 | gguf-Q8_0 …
    bytes: int  # on the device while it is used


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    family: str
    card: Card
    mode: str  # one of MODES
    text_encoders: str  # device | offload | cpu | sequential
    placements: tuple[Placement, ...]
    vae_tiling_above: int  # pixels; larger images decode in tiles
    peak: int  # estimated bytes
    reason: str
    # The estimate per phase: (("encode", bytes), ("denoise", bytes), ("decode", bytes)).
    phases: tuple[tuple[str, int], ...] = ()

    @property
    def fits(self) -> bool:
        return self.peak <= self.card.budget


class MemoryPlanError(DeviceError):
    """No plan fits (or the configured one does not): one line naming the model, the
    card, the sizes, and the smallest card that would do. A DeviceError: the worker
    stops at start with this line rather than run out of memory in a member's job."""


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GB"


def size_text(n: float) -> str:
    """Bytes as a member reads them: "3.2 GB", "412 MB" below one GB, "35 KB"."""
    if n >= GiB:
        return gib(n)
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def plan_memory(
    model: str,
    family: str,
    components: tuple[ComponentSize, ...],
    card: Card,
    jobs: Jobs,
    setting: str = "auto",
    text_encoders: str = "auto",
) -> MemoryPlan:
    """The cheapest plan that fits, or MemoryPlanError. `setting`: "auto" or a mode;
    `text_encoders`: "auto" or one placement (a benchmark measuring each ladder step)."""
    if setting not in MEMORY_SETTINGS:
        raise MemoryPlanError(
            f"{model}: memory = {setting!r} is not one of {', '.join(MEMORY_SETTINGS)}"
        )
    candidates = [
        c
        for c in _candidates(card, components)
        if setting in ("auto", c[0]) and text_encoders in ("auto", c[1])
    ]
    if not candidates:
        allowed = ", ".join(dict.fromkeys(m for m, _ in _candidates(card, components)))
        forced = f" with text encoders {text_encoders!r}" if text_encoders != "auto" else ""
        raise MemoryPlanError(
            f"{model}: memory = {setting!r}{forced} cannot be used on {card.name} (it can use "
            f'auto, {allowed}); set memory = "auto"'
        )
    plans = [_plan(model, family, components, card, jobs, m, t) for m, t in candidates]
    for plan in plans:
        if plan.fits:
            return plan
    raise MemoryPlanError(_no_fit(model, family, components, card, jobs, plans, setting))


def _candidates(card: Card, components: tuple[ComponentSize, ...]) -> list[tuple[str, str]]:
    ladder = CPU_LADDER if card.kind == "cpu" else GPU_LADDER
    if not any(c.role == "text_encoder" for c in components):
        ladder = tuple(dict.fromkeys((m, "device") for m, _ in ladder))
    if _denoiser(components).stored_dtype.startswith("gguf"):
        # A GGUF file is already small; fp8 on top means nothing, and diffusers'
        # block/leaf streaming of GGUF parameters is untested here.
        ladder = tuple(c for c in ladder if c[0] in ("full", "offload"))
    return list(ladder)


def _denoiser(components: tuple[ComponentSize, ...]) -> ComponentSize:
    for c in components:
        if c.role == "denoiser":
            return c
    raise MemoryPlanError("a model without a UNet or transformer cannot be planned")


def _plan(model, family, components, card, jobs, mode, text) -> MemoryPlan:
    fam = family_memory(family)
    cbytes = _BYTES[card.compute_dtype]
    den = _denoiser(components)
    tes = [c for c in components if c.role == "text_encoder"]
    vae = next((c for c in components if c.role == "vae"), None)
    den_full = _weights_bytes(den, "fp8" if "fp8" in mode else "native", cbytes)
    den_used = {
        "group": (den.loose_params + 2 * den.block_params) * cbytes,
        "sequential": 2 * den.largest_tensor * cbytes,
    }.get(mode, den_full)
    if "fp8" in mode:  # the layer being computed, upcast, and the previous one being freed
        den_used += 2 * den.largest_tensor * cbytes
    resident = mode in ("full", "fp8")
    te_sizes = [(c, c.params * cbytes) for c in tes]
    te_each = {
        "device": sum(b for _, b in te_sizes),
        "offload": max((b for _, b in te_sizes), default=0),
        "cpu": 0,
        "sequential": 2 * max((c.largest_tensor for c in tes), default=0) * cbytes,
    }[text]
    te_resident = te_each if text == "device" else 0
    vae_bytes = (vae.params * cbytes if vae else 0) if mode != "sequential" else 0
    den_resident = den_full if resident else 0
    vae_resident = vae_bytes if resident else 0
    # The family's widths, or the model's own where its files say (a tiny test model).
    fam = dataclasses.replace(
        fam, width=den.width or fam.width, vae_width=(vae.width if vae else 0) or fam.vae_width
    )
    act = _denoise_activations(fam, jobs.call_pixels, cbytes)
    encode = den_resident + vae_resident + te_each + (64 << 20 if text != "cpu" else 0)
    denoise = den_used + te_resident + (vae_resident if resident else 0) + act
    room = card.budget - (den_resident + te_resident + vae_bytes)
    per_pixel = _decode_bytes_per_pixel(fam, card)
    tiling = _tiling_above(fam, jobs, room, per_pixel)
    decode_act = _decode_activations(fam, tiling, jobs, per_pixel)
    decode = den_resident + te_resident + vae_bytes + decode_act
    phases = (("encode", encode), ("denoise", denoise), ("decode", decode))
    peak = max(encode, denoise, decode)
    placements = _placements(components, mode, text, den_used, cbytes, den)
    plan = MemoryPlan(model, family, card, mode, text, placements, tiling, peak, "", phases)
    return _with_reason(plan, fam)


def _weights_bytes(component: ComponentSize, storage: str, cbytes: int) -> int:
    if component.stored_dtype.startswith("gguf"):
        return component.stored_bytes
    if storage == "fp8":
        return component.fp8_params + (component.params - component.fp8_params) * cbytes
    return component.params * cbytes


def _denoise_activations(fam: FamilyMemory, pixels: int, cbytes: int) -> int:
    tokens = pixels / fam.latent_pixels + fam.text_tokens
    return int(fam.cfg_batch * tokens * fam.width * fam.act_factor * cbytes)


def _decode_bytes_per_pixel(fam: FamilyMemory, card: Card) -> float:
    """The VAE decode's working set per image pixel. On the CPU a 3-D decoder's convs are
    computed by unfolding each input (kernel volume × width values per pixel, torch's
    slow_conv3d), which CUDA's convolutions do not hold."""
    factor = fam.vae_factor + (fam.vae_cpu_unfold if card.kind == "cpu" else 0)
    return fam.vae_width * factor * _BYTES[card.compute_dtype]


def _decode_activations(fam: FamilyMemory, tiling_above: int, jobs: Jobs, per_pixel) -> int:
    """One image at a time (slicing); tiled above the threshold (a tile's working set)."""
    pixels = jobs.image_pixels
    if pixels > tiling_above:
        pixels = min(pixels, fam.vae_tile**2)
    return int(pixels * per_pixel)


def _tiling_above(fam: FamilyMemory, jobs: Jobs, room: int, per_pixel: float) -> int:
    """The configured threshold, lowered (in steps of 64² pixels) until an untiled
    decode fits the room the weights leave; never below one tile."""
    fitting = int(room / per_pixel) if per_pixel else jobs.vae_tiling_above
    threshold = min(jobs.vae_tiling_above, max(fitting, fam.vae_tile**2))
    return max(threshold - threshold % 4096, 4096)


def _placements(components, mode, text, den_used, cbytes, den) -> tuple[Placement, ...]:
    where_den = {"full": "device", "fp8": "device", "fp8-offload": "offload"}.get(mode, mode)
    out = []
    for c in components:
        if c is den:
            weights = c.stored_dtype if c.stored_dtype.startswith("gguf") else None
            weights = weights or ("fp8" if "fp8" in mode else _native(cbytes))
            out.append(Placement(c.name, where_den, weights, den_used))
        elif c.role == "text_encoder":
            out.append(Placement(c.name, text, _native(cbytes), c.params * cbytes))
        else:
            where = "device" if mode in ("full", "fp8") else where_den
            out.append(Placement(c.name, where, _native(cbytes), c.params * cbytes))
    return tuple(out)


def _native(cbytes: int) -> str:
    return {4: "fp32", 2: "bf16"}[cbytes]


def _with_reason(plan: MemoryPlan, fam: FamilyMemory) -> MemoryPlan:
    parts = []
    for p in plan.placements:
        label = fam.names.get(p.component, p.component)
        if p.component in ("unet", "transformer"):
            parts.append(_denoiser_words(plan.mode, p))
        elif p.where == "cpu":
            parts.append(f"{label} on the CPU")
        elif p.where == "offload" and plan.mode in ("full", "fp8"):
            parts.append(f"{label} moved in to encode ({gib(p.bytes)})")
    if plan.text_encoders == "sequential":
        parts.append("every part streamed layer by layer")
    parts.append(f"VAE tiled above {_side(plan.vae_tiling_above)}")
    card = f"{plan.card.name} {gib(plan.card.total)}"
    text = f"{plan.model} on {card}: {', '.join(parts)}; est. peak {gib(plan.peak)}"
    return MemoryPlan(**{**plan.__dict__, "reason": text})


def _denoiser_words(mode: str, p: Placement) -> str:
    return {
        "full": f"{p.component} {p.weights} ({gib(p.bytes)})",
        "fp8": f"{p.component} fp8 ({gib(p.bytes)})",
        "offload": f"model CPU offload ({p.component} {gib(p.bytes)})",
        "fp8-offload": f"{p.component} fp8 ({gib(p.bytes)}) with model CPU offload",
        "group": f"{p.component} streamed block by block ({gib(p.bytes)} on the card)",
        "sequential": "sequential CPU offload",
    }[mode]


def _side(pixels: int) -> str:
    side = int(pixels**0.5)
    return f"{side}²" if side * side == pixels else f"{pixels / 1e6:.1f} Mpx"


def _no_fit(model, family, components, card, jobs, plans, setting) -> str:
    sizes = ", ".join(f"{c.name} {gib(c.params * _BYTES[card.compute_dtype])}" for c in components)
    where = f"{card.name} {gib(card.total)} ({gib(card.free)} free)"
    what = f"memory = {setting!r}" if setting != "auto" else "no memory plan"
    need = min((p.peak for p in plans), default=0)
    if card.kind == "cpu":
        return (
            f"{model} does not fit {where} with {what} ({sizes}); it needs about "
            f"{gib(need + GiB // 2)} of free RAM"
        )
    smallest = next((s for s in CARD_SIZES if _card_fits(need, s)), None)
    advice = f"a {smallest} GB card would do" if smallest else "no single card would"
    if setting != "auto":
        advice += '; memory = "auto" picks a plan that fits'
    return (
        f"{model} does not fit {where} with {what} ({sizes}; the smallest plan needs "
        f"{gib(need)}): {advice}"
    )


def _card_fits(need: int, size_gib: int) -> bool:
    total = size_gib * GiB
    return need <= Card("", total, total).budget


def gpu_card(name: str, total: int, free: int, compute_dtype: str = "bf16", host_ram: int = 0):
    return Card(name, total, free, "cuda", compute_dtype, host_ram)


def cpu_card(ram_total: int, ram_free: int) -> Card:
    return Card("CPU", ram_total, ram_free, "cpu", "fp32")


def published_components(family: str) -> tuple[ComponentSize, ...]:
    """The family's components as published (bench/component_sizes.py)."""
    from pipeline.contract.families.published_sizes import PUBLISHED_SIZES

    return tuple(
        ComponentSize(name=name, **sizes) for name, sizes in PUBLISHED_SIZES[family].items()
    )


def jobs_for(config, model) -> Jobs:
    """The largest call the server allows (`config`: a Config; `model`: its ModelConfig).
    A job larger than `max_batch_pixels` still runs alone (Runner.split_by_pixels)."""
    limits, workers = config.limits, config.workers
    call = max(workers.max_batch_pixels, limits.max_count * limits.max_pixels)
    return Jobs(limits.max_pixels, call, model.vae_tiling_above)


def components_for(model, family: str) -> tuple[tuple[ComponentSize, ...], str]:
    """The model's components from its own files' headers, else the family's published
    sizes; with where they came from ("files" | "published")."""
    from pipeline.contract.families.weight_sizes import model_sizes

    skip = family_memory(family).skip_patterns
    components = model_sizes(model.source, skip)
    if any(c.role == "denoiser" for c in components):
        return components, "files"
    return published_components(family), "published"


def ram_card() -> Card:
    """The CPU worker's card: this machine's RAM (total, and available now)."""
    values = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    import os

    total = values.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return cpu_card(total, values.get("MemAvailable", total))


def plan_for(config, model, card: Card) -> MemoryPlan:
    """The plan for a configured model on a card; MemoryPlanError when none fits.
    The family comes from the config or the model's files (ModelError if unreadable)."""
    family = model.family if model.family != "auto" else detect_family(model.source)
    components, _ = components_for(model, family)
    return plan_memory(model.name, family, components, card, jobs_for(config, model), model.memory)
