"""Generation modes: txt2img, img2img, inpaint, outpaint, upscale, keep-face and
face fix, with previews and infotext (`modes`); prompt editing, alternation and AND
in the denoising loop (`conditioning`). Worker side (torch)."""
