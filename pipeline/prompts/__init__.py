"""Prompt *encoding* (A1111 weights, 75-token chunks, BREAK, SDXL pooled). The
syntax it encodes is parsed by the torch-free `pipeline.contract.prompt_syntax` and
`pipeline.contract.prompt_schedule` (editing, alternation, AND)."""
