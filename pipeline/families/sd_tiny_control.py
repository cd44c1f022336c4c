"""Tiny random-weight ControlNet, IP-Adapter and depth model that fit the tiny SD model.

Like `pipeline.families.sd_tiny`, these let every test run real diffusers/transformers code
where nothing can be downloaded. Each is saved in the layout its loader reads:

- ControlNet: a diffusers `ControlNetModel` folder, made from the tiny UNet with
  `ControlNetModel.from_unet` (so it fits SD 1.x or SDXL like a real one fits its base
  model). Its zero-initialised output convolutions get small random weights, else a
  freshly made ControlNet would change nothing.
- IP-Adapter: `ip_adapter.safetensors` with the original `image_proj.*` / `ip_adapter.*`
  keys (what h94/IP-Adapter ships and diffusers' `load_ip_adapter` reads), beside an
  `image_encoder/` folder holding a tiny `CLIPVisionModelWithProjection`.
- Depth: a tiny DPT (`DPTForDepthEstimation`) with its image processor, loadable by
  transformers' `pipeline("depth-estimation")`.
- Pose: a tiny ViTPose (`VitPoseForPoseEstimation`, 17 COCO keypoints) with its image
  processor, and a tiny person detector (RT-DETR, one class "person") for
  `pipeline("object-detection")`.
- Segmentation: a tiny SegFormer with ADE20K's 150 classes and its image processor, for
  `pipeline("image-segmentation")`.

`write_tiny_config` writes the config.toml naming all of them.
"""

from __future__ import annotations

from pathlib import Path

CLIP_IMAGE_SIZE = 32
CLIP_PROJECTION = 32
IP_TOKENS = 4  # the base IP-Adapter's image tokens


def _unet(model_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_dir / "unet")


def write_tiny_controlnet(model_dir: str | Path, directory: str | Path) -> Path:
    import torch
    from diffusers import ControlNetModel

    directory = Path(directory)
    unet = _unet(Path(model_dir))
    if unet.config.in_channels != 4:
        raise ValueError("make the tiny ControlNet from a 4-channel (not inpainting) model")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block]
        zero_convs.append(net.controlnet_cond_embedding.conv_out)
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
            conv.bias.zero_()
    net.save_pretrained(directory, safe_serialization=True)
    return directory


def write_tiny_ip_adapter(
    model_dir: str | Path, directory: str | Path, *, projection_dim: int = CLIP_PROJECTION
) -> Path:
    """`projection_dim`: the CLIP image embedding's width (1024 for the real SD 1.5
    IP-Adapter's ViT-H; the benchmark uses it, the tests keep it tiny)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unet = _unet(Path(model_dir))
    cross = unet.config.cross_attention_dim
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=projection_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=CLIP_IMAGE_SIZE,
            patch_size=8,
        )
    )
    encoder.save_pretrained(directory / "image_encoder", safe_serialization=True)
    generator = torch.Generator().manual_seed(1)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * scale).contiguous()

    tensors = {
        "image_proj.proj.weight": rand(IP_TOKENS * cross, projection_dim),
        "image_proj.proj.bias": rand(IP_TOKENS * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    # Original IP-Adapter numbering: every attention processor counts, the
    # cross-attention ones (attn2) carry the weights, so their ids are 1, 3, 5, …
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        module = unet.get_submodule(name[: -len(".processor")])
        hidden = module.to_k.weight.shape[0]
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross, scale=0.5)
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross, scale=0.5)
        key_id += 2
    save_file(tensors, str(directory / "ip_adapter.safetensors"))
    return directory


def write_tiny_depth(directory: str | Path) -> Path:
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    directory = Path(directory)
    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_in_index=-1,
    )
    DPTForDepthEstimation(config).save_pretrained(directory, safe_serialization=True)
    DPTImageProcessor(
        size={"height": 32, "width": 32}, keep_aspect_ratio=False, ensure_multiple_of=8
    ).save_pretrained(directory)
    return directory


def _image_processor(name: str):
    """transformers' PIL image processor `name` (the default class needs torchvision)."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def write_tiny_pose(directory: str | Path, *, experts: int = 1) -> Path:
    """`experts` > 1: a ViTPose++ (mixture-of-experts backbone, one expert per dataset)."""
    import torch
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    directory = Path(directory)
    torch.manual_seed(0)
    backbone = VitPoseBackboneConfig(
        image_size=[32, 24],
        patch_size=[8, 8],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        part_features=8,
        num_experts=experts,
    )
    config = VitPoseConfig(backbone_config=backbone, num_labels=17)  # COCO's 17 keypoints
    VitPoseForPoseEstimation(config).save_pretrained(directory, safe_serialization=True)
    _image_processor("VitPoseImageProcessor")(size={"height": 32, "width": 24}).save_pretrained(
        directory
    )
    return directory


def write_tiny_person_detector(directory: str | Path) -> Path:
    import torch
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    directory = Path(directory)
    torch.manual_seed(0)
    config = RTDetrConfig(
        backbone_config=RTDetrResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 8, 16, 16],
            depths=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        ),
        encoder_hidden_dim=16,
        encoder_in_channels=[8, 16, 16],
        feat_strides=[8, 16, 32],
        encoder_ffn_dim=16,
        encoder_attention_heads=2,
        d_model=16,
        decoder_in_channels=[16, 16, 16],
        decoder_ffn_dim=16,
        decoder_attention_heads=2,
        decoder_layers=1,
        encoder_layers=1,
        num_queries=10,
        num_labels=1,
        id2label={0: "person"},
        label2id={"person": 0},
    )
    RTDetrForObjectDetection(config).save_pretrained(directory, safe_serialization=True)
    _image_processor("RTDetrImageProcessor")(size={"height": 64, "width": 64}).save_pretrained(
        directory
    )
    return directory


def write_tiny_segmentation(directory: str | Path) -> Path:
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    directory = Path(directory)
    torch.manual_seed(0)
    config = SegformerConfig(
        num_labels=150,  # ADE20K's classes, as the ControlNet seg models' palette has
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(directory, safe_serialization=True)
    _image_processor("SegformerImageProcessor")(size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


def write_tiny_config(
    directory: str | Path,
    *,
    xl: bool,
    controlnet: bool,
    ip_adapter: bool,
    depth: bool,
    pose: bool = False,
    segmentation: bool = False,
) -> Path:
    """DIR/config.toml: the tiny model in DIR, a CPU worker, small defaults, and the
    ControlNet units / IP-Adapter written beside it."""
    directory = Path(directory)
    family = "sdxl" if xl else "sd1"
    lines = [
        "# Written by `sdbot tiny-model`: the tiny random-weight model in this folder.",
        "[models.tiny]",
        'source = "./"',
        f'family = "{family}"',
        "",
        "[storage]",
        'data_dir = "./data"',
        "",
        "[defaults]",
        'sampler = "Euler a"',
        'schedule = "Automatic"',
        "steps = 4",
        "width = 64",
        "height = 64",
        "",
        "[workers]",
        'devices = ["cpu"]',
        "",
    ]
    folders = {"depth_model": depth, "pose_model": pose, "segmentation_model": segmentation}
    control = [f'{key} = "./{key[: -len("_model")]}"' for key, on in folders.items() if on]
    if pose:
        control.append('pose_detector = "./pose_detector"')
    if control:
        lines += ["[control]", *control, ""]
    if controlnet:
        units = [("canny", "canny", "edges"), ("pose", "openpose" if pose else "none", "pose")]
        if segmentation:
            units.append(("seg", "seg_ofade20k", ""))
        for name, pre, kind in units:
            lines += [
                f"[controlnets.{name}]",
                'source = "./controlnet"',
                f'family = "{family}"',
                f'preprocessor = "{pre}"',
                f'kind = "{kind}"',
                "",
            ]
        if depth:
            lines += [
                "[controlnets.depth]",
                'source = "./controlnet"',
                f'family = "{family}"',
                'preprocessor = "depth"',
                'kind = "depth"',
                "",
            ]
    if ip_adapter:
        lines += ["[ip_adapters.tiny]", 'source = "./ip_adapter"', f'family = "{family}"', ""]
    path = directory / "config.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
