"""The torch-free contract between the bot and the workers.

Everything here is imported by the bot process, which must never load torch,
diffusers, transformers, peft or OpenCV: job specs and events, config, the blob
store, infotext, the prompt *syntax* (parsing, not encoding), safe image decoding,
sampler names and the worker-pool interface. `tests/test_layering.py` imports each
module in a fresh interpreter and checks that none of those libraries is loaded.
"""
