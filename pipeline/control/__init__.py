"""ControlNet and IP-Adapter on the worker (imports torch, diffusers, OpenCV).

- `preprocessors`: photo → control map (canny, lineart, depth, …), then fitted to the
  job's size by the unit's resize mode, as sd-webui-controlnet does; `pose` (openpose:
  ViTPose keypoints drawn as the OpenPose skeleton) and `segmentation` (seg_ofade20k:
  ADE20K classes in its palette) are the model-based ones.
- `controlnet_file`: single-file ControlNets, loaded offline (configuration derived).
- `scheduled`: ControlNets under prompt editing and AND, run per UNet row.
- `units`: the configured ControlNets, loaded once per worker and kept in an LRU
  cache; the ControlNet pipelines derived from a loaded model; control modes.
- `ip_adapter`: IP-Adapters loaded once and switched on only for the jobs that use them.

The torch-free specs (ControlUnit, Reference) live in `pipeline.contract.control`.
"""
