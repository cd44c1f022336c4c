"""LoRAs kept loaded for one pipeline, least recently used evicted by the bytes their
tensors occupy on the device, applied to a job (or a mixed batch) by
`pipeline.loras.batch`. A popular LoRA costs nothing the second time.

Loading never changes the model: a file's tensors are mapped onto the model's layers
and kept beside it, so a job without LoRAs draws exactly the image it drew before any
LoRA was loaded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.contract.jobs import LoraRef
from pipeline.families import of_pipe
from pipeline.loras import batch, slots
from pipeline.loras.formats import LayerDelta, LoraError, map_lora, read_lora_file

log = logging.getLogger(__name__)


def adapter_name(sha256: str) -> str:
    return f"lora_{sha256[:16]}"


@dataclass
class _Loaded:
    name: str  # the member's name for it (the first one used)
    layers: dict[tuple[str, str], LayerDelta]
    nbytes: int
    notice: str | None  # told to the member with every result that uses it


class LoraCache:
    """LoRA adapters kept loaded beside one pipeline, least recently used evicted."""

    def __init__(self, pipe: Any, *, max_bytes: int, max_file_bytes: int | None = None) -> None:
        self.pipe = pipe
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes or max_bytes
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._unfit: dict[str, str | None] = {}  # adapter → why it cannot go in a slot

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "bytes": sum(a.nbytes for a in self._loaded.values()),
            "loaded": len(self._loaded),
        }

    def loaded(self) -> list[str]:
        """Adapter names, least recently used first."""
        return list(self._loaded)

    def notices(self, refs: Sequence[LoraRef]) -> list[str]:
        """What the member must be told about these LoRAs (e.g. layers that did not fit)."""
        seen = []
        for ref in refs:
            loaded = self._loaded.get(adapter_name(ref.sha256))
            if loaded is not None and loaded.notice and loaded.notice not in seen:
                seen.append(loaded.notice.replace(f"'{loaded.name}'", f"'{ref.name}'"))
        return seen

    @contextmanager
    def activate(self, loras: Sequence[tuple[LoraRef, Path]], *, images: int = 1) -> Iterator[None]:
        """Run the pipeline (prompt encoding included) with these LoRAs at their weights
        (`images`: how many the call makes, for the UNet's LoRA slots)."""
        weights = self._prepare([loras])
        if not weights[0]:
            yield
            return
        with self._apply(weights, batch.RowPlan(weights, uniform=True), images):
            yield

    @contextmanager
    def activate_per_sample(
        self, per_sample: Sequence[Sequence[tuple[LoraRef, Path]]], *, cfg: bool
    ) -> Iterator[None]:
        """One pipeline call where sample i runs with its own LoRAs and weights.

        Inside, the UNet must see the batch as diffusers builds it (samples in order, and
        with `cfg` the negative half then the positive half), and prompts must be encoded
        together with `pipeline.prompts.encoding.encode_prompts`, which feeds the text
        encoders sample by sample with equal rows per sample.
        """
        weights = self._prepare(per_sample)
        with self._apply(weights, batch.RowPlan(weights, cfg=cfg), len(weights)):
            yield

    @contextmanager
    def _apply(
        self, weights: list[dict[str, float]], plan: batch.RowPlan, images: int
    ) -> Iterator[None]:
        """UNet LoRAs in the UNet's slots when they all fit (`pipeline.loras.slots`),
        text-encoder layers (and UNet LoRAs that do not fit) on the eager path."""
        layers = self._layers(weights)
        family = of_pipe(self.pipe)
        bank = slots.bank_of(family.denoiser(self.pipe))
        denoiser = family.denoiser_name
        if bank is None or not self._into_slots(bank, weights, images):
            with batch.patched(self._modules(), layers, plan, denoiser=denoiser):
                yield
            return
        encoders = {key: entries for key, entries in layers.items() if key[0] != denoiser}
        bank.set_rows(weights)
        bank.stats.calls += 1
        try:
            with batch.patched(self._modules(), encoders, plan, denoiser=denoiser):
                yield
        finally:
            bank.clear_rows()

    def _into_slots(self, bank: Any, weights: list[dict[str, float]], images: int) -> bool:
        """Copy the UNet LoRAs into slots if they all fit; else say why (eager path)."""
        names = sorted({a for sample in weights for a in sample})
        unet_layers = {}
        for name in names:
            layers = self._loaded[name].layers.items()
            found = {p: d for (m, p), d in layers if m == of_pipe(self.pipe).denoiser_name}
            if found:
                unet_layers[name] = found
        reason = None
        if not unet_layers:
            return True  # text-encoder LoRAs only: the UNet runs its (compiled) graph
        if len(unet_layers) > bank.slots:
            reason = f"{len(unet_layers)} UNet LoRAs > {bank.slots} slots"
        elif 2 * images > bank.rows:
            reason = f"{images} images > {bank.rows // 2} slot rows"
        else:
            for name, found in unet_layers.items():
                if name not in self._unfit:
                    self._unfit[name] = bank.unfit(found)
                if self._unfit[name]:
                    reason = self._unfit[name]
                    break
        if reason is not None:
            bank.stats.eager += 1
            bank.stats.reasons[reason] = bank.stats.reasons.get(reason, 0) + 1
            log.info("LoRAs run on the eager path (not in slots): %s", reason)
            return False
        for name, found in unet_layers.items():
            bank.ensure(name, found, keep=set(unet_layers))
        return True

    def _layers(
        self, weights: list[dict[str, float]]
    ) -> dict[tuple[str, str], dict[str, LayerDelta]]:
        layers: dict[tuple[str, str], dict[str, LayerDelta]] = {}
        for name in sorted({a for sample in weights for a in sample}):
            for key, delta in self._loaded[name].layers.items():
                layers.setdefault(key, {})[name] = delta
        return layers

    def _prepare(
        self, per_sample: Sequence[Sequence[tuple[LoraRef, Path]]]
    ) -> list[dict[str, float]]:
        """Load every adapter the samples need; return each sample's {adapter: weight}."""
        needed = {adapter_name(ref.sha256) for sample in per_sample for ref, _ in sample}
        weights = []
        for sample in per_sample:
            sample_weights: dict[str, float] = {}
            for ref, path in sample:
                name = self._ensure(ref, path, keep=needed)
                sample_weights[name] = sample_weights.get(name, 0.0) + ref.weight
            weights.append(sample_weights)
        return weights

    def _ensure(self, ref: LoraRef, path: Path, *, keep: set[str]) -> str:
        name = adapter_name(ref.sha256)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            self.hits += 1
            return name
        self.misses += 1
        loaded = self._load(ref, path)
        self._evict_for(loaded.nbytes, keep)
        self._loaded[name] = loaded
        return name

    def _evict_for(self, nbytes: int, keep: set[str]) -> None:
        for name in list(self._loaded):
            if self.stats()["bytes"] + nbytes <= self.max_bytes:
                return
            if name not in keep:
                del self._loaded[name]

    def _load(self, ref: LoraRef, path: Path) -> _Loaded:
        family = of_pipe(self.pipe)
        lora = read_lora_file(
            path, name=ref.name, family=family.name, max_bytes=self.max_file_bytes
        )
        mapped = map_lora(lora, self.pipe)
        if not mapped.layers:
            log.warning(
                "LoRA %s (%s): no layer fits; e.g. %s", ref.name, path, mapped.unmatched[:3]
            )
            raise LoraError(
                f"LoRA '{ref.name}' ({lora.format}) does not fit this {family.label} "
                "model: none of its layers match (it was made for another base model, "
                "or the file is damaged)"
            )
        notice = None
        if mapped.unmatched:
            missing = len(mapped.unmatched)
            notice = (
                f"LoRA '{ref.name}': {missing} of {mapped.total} layers do not fit this "
                f"model and were left out"
            )
            log.warning("%s (e.g. %s)", notice, mapped.unmatched[:3])
        modules = self._modules()
        layers = {}
        for (model_name, module_path), delta in mapped.layers.items():
            device = modules[model_name].get_submodule(module_path).weight.device
            layers[(model_name, module_path)] = delta.to(device)
        nbytes = sum(d.nbytes for d in layers.values())
        return _Loaded(ref.name, layers, nbytes, notice)

    def _modules(self) -> dict[str, Any]:
        return dict(of_pipe(self.pipe).adaptable(self.pipe))
