"""Where jobs run: LocalPool (one process per device), RayPool, and the Runner.

The pools are imported by the bot process and stay torch-free at import; the Runner
and everything it calls import torch only inside the worker process.
"""
