"""Generation modes: txt2img, img2img, inpaint, outpaint, upscale, keep-face and
face fix, with previews and infotext. Worker side (torch)."""
