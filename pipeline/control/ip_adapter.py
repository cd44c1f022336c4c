"""IP-Adapter on a worker: loaded once per model, switched on only for the jobs using it.

diffusers' `load_ip_adapter` replaces the UNet's attention processors and adds an image
projection; once it has, every call must pass image embeddings. So after loading we
keep the adapter's processors and projection aside and put the plain ones back; a job
with a reference switches them in for its call (`activate`) and out afterwards. The
UNet is shared by the txt2img, img2img, inpaint and ControlNet pipelines, so the one
switch serves all of them, and LoRAs (peft layers inside the attention modules, not
processors) stay as they are.

Embeddings are computed here from the CLIP image encoder: several reference images are
averaged (the image embeds, or the penultimate hidden states for "plus"/face variants),
the unconditional side is zeros (plus variants: the encoding of a black image), as
diffusers and the IP-Adapter reference code do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.contract.families import label as family_label
from pipeline.contract.jobs import JobError

log = logging.getLogger(__name__)

WEIGHT_NAMES = ("ip_adapter.safetensors", "ip_adapter.bin")


@dataclass
class _Loaded:
    processors: dict[str, Any]
    projection: Any
    encoder: Any
    image_processor: Any
    hidden_states: bool  # plus/face variants read the penultimate hidden states
    label: str


def weights_file(source: str) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        if len(files) == 1:
            return files[0]
        raise JobError(
            f"IP-Adapter folder {source} has no ip_adapter.safetensors (and not exactly one "
            ".safetensors/.bin file to use instead)"
        )
    raise JobError(f"IP-Adapter source {source} does not exist")


def read_state_dict(path: Path) -> dict[str, dict[str, Any]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        state: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                group, _, rest = key.partition(".")
                if group in state:
                    state[group][rest] = f.get_tensor(key)
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not state.get("image_proj") or not state.get("ip_adapter"):
        raise JobError(f"{path.name} is not an IP-Adapter (no image_proj/ip_adapter weights)")
    return state


class IPAdapters:
    """The IP-Adapters of one loaded model (one UNet)."""

    def __init__(self, config: Any, model: Any, pipe: Any):
        self.config = config
        self.model = model
        self.pipe = pipe  # the pipeline whose UNet gets the adapters
        self._plain: dict[str, Any] | None = None
        self._loaded: dict[str, _Loaded] = {}

    def label(self, name: str) -> str:
        return self._get(name).label

    @contextmanager
    def activate(self, name: str, weight: float) -> Iterator[_Loaded]:
        loaded = self._get(name)
        unet = self.model.kind.denoiser(self.pipe)
        for processor in loaded.processors.values():
            if hasattr(processor, "scale"):
                processor.scale = [weight] * len(processor.scale)
        unet.set_attn_processor(dict(loaded.processors))
        unet.encoder_hid_proj = loaded.projection
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        try:
            yield loaded
        finally:
            self._switch_off()

    def embeddings(self, name: str, images: Sequence[Image.Image], cfg: bool) -> list[torch.Tensor]:
        """`ip_adapter_image_embeds`: one entry (this adapter) shaped (2 or 1, 1, …), the
        unconditional half first when CFG is on; the pipeline repeats it over the batch."""
        positive, negative = self._encode(self._get(name), images)
        embeds = positive[None, None]
        if cfg:
            embeds = torch.cat([negative[None, None], embeds])
        return [embeds.to(self.model.device, self.model.dtype)]

    def _encode(self, loaded: _Loaded, images: Sequence[Image.Image]):
        encoder = loaded.encoder
        pixels = loaded.image_processor(
            images=[i.convert("RGB") for i in images], return_tensors="pt"
        )
        pixels = pixels.pixel_values.to(encoder.device, encoder.dtype)
        with torch.inference_mode():
            if loaded.hidden_states:
                hidden = encoder(pixels, output_hidden_states=True).hidden_states[-2]
                black = encoder(torch.zeros_like(pixels[:1]), output_hidden_states=True)
                return hidden.mean(0), black.hidden_states[-2][0]
            embeds = encoder(pixels).image_embeds
            return embeds.mean(0), torch.zeros_like(embeds[0])

    def _switch_off(self) -> None:
        unet = self.model.kind.denoiser(self.pipe)
        if self._plain is not None:
            unet.set_attn_processor(dict(self._plain))
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None

    def _get(self, name: str) -> _Loaded:
        entry = self.config.ip_adapters.get(name)
        if entry is None:
            names = ", ".join(self.config.ip_adapters) or "none"
            raise JobError(f"unknown IP-Adapter '{name}'; configured: {names}")
        if entry.family != self.model.family:
            raise JobError(
                f"IP-Adapter '{name}' is for {family_label(entry.family)} but the model is "
                f"{family_label(self.model.family)}"
            )
        if name not in self._loaded:
            self._loaded[name] = self._load(entry)
        return self._loaded[name]

    def _load(self, entry: Any) -> _Loaded:
        from diffusers.models.embeddings import ImageProjection
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from pipeline.control.units import file_hash

        path = weights_file(entry.source)
        state = read_state_dict(path)
        encoder_source = entry.image_encoder or str(
            (path.parent if Path(entry.source).is_file() else Path(entry.source)) / "image_encoder"
        )
        pipe, unet = self.pipe, self.model.kind.denoiser(self.pipe)
        if self._plain is None:
            self._plain = dict(unet.attn_processors)
        try:
            encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_source).to(
                self.model.device, self.model.dtype
            )
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise JobError(
                f"IP-Adapter '{entry.name}': its image encoder {encoder_source} could not be "
                f"loaded ({type(exc).__name__})"
            ) from None
        encoder.eval()
        try:
            pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
        except Exception as exc:  # noqa: BLE001 - shape mismatches etc.
            self._switch_off()
            raise JobError(
                f"IP-Adapter '{entry.name}' does not fit model '{self.model.name}' (made for "
                f"another base model or family?): {type(exc).__name__}"
            ) from None
        loaded = _Loaded(
            processors=dict(unet.attn_processors),
            projection=unet.encoder_hid_proj,
            encoder=encoder,
            image_processor=CLIPImageProcessor(
                size=encoder.config.image_size, crop_size=encoder.config.image_size
            ),
            hidden_states=not isinstance(
                unet.encoder_hid_proj.image_projection_layers[0], ImageProjection
            ),
            label=f"{entry.name} [{file_hash(str(path))}]",
        )
        self._switch_off()
        log.info("loaded IP-Adapter %s for model %s", entry.name, self.model.name)
        return loaded
