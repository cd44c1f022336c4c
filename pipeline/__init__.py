"""The engine, in packages named for what runs where (docs/ARCHITECTURE.md):

- `contract/`: torch-free; imported by the bot process and the workers alike.
- `workers/`: the worker pools (torch-free at import) and the Runner (worker side).
- `models/`, `generate/`, `prompts/`, `loras/`, `faces/`, `training/`: worker side.
"""
