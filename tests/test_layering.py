"""The one architectural rule, checked: the bot process never loads the GPU stack.

`pipeline/contract/` is imported by the bot and the workers alike, and `bot/` is the
bot process: importing any of their modules, each in a fresh interpreter, must leave
torch, diffusers, transformers, peft, OpenCV, onnxruntime and dlib out of `sys.modules`.
A static pass also catches imports hidden inside functions, which an import-time check
cannot see (they would load the library the first time that function runs).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "peft", "cv2", "onnxruntime", "nudenet", "dlib")

# Code in bot/ that runs somewhere other than the bot process, and so may import the
# worker side of pipeline/ (inside its functions): the CLI (`sdbot generate`, `train`,
# `doctor`… run in the admin's shell), and the functions the bot's photo helper
# process executes (bot/photo_helper/process.py starts it; bot/photo_helper/work.py is its work).
OUTSIDE_THE_BOT_PROCESS = ("bot/cli", "bot/photo_helper/work.py")
# What the bot process may import of pipeline/: the torch-free contract and the pools.
BOT_MAY_IMPORT = ("pipeline.contract", "pipeline.workers.local_pool", "pipeline.workers.ray_pool")


def _modules(folder: str) -> list[str]:
    root = REPO / folder
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


TORCH_FREE = _modules("pipeline/contract") + _modules("bot") + ["pipeline.workers.local_pool"]


def _heavy_after_import(module: str) -> list[str]:
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"importing {module} failed:\n{result.stderr[-2000:]}"
    return [m for m in result.stdout.strip().split(",") if m]


def test_importing_any_torch_free_module_loads_no_gpu_library() -> None:
    # One fresh interpreter per module (an earlier import would hide a later one's).
    with ThreadPoolExecutor(max_workers=2) as pool:
        loaded = dict(zip(TORCH_FREE, pool.map(_heavy_after_import, TORCH_FREE)))
    assert len(loaded) > 30  # the module lists really were found
    offenders = {module: libs for module, libs in loaded.items() if libs}
    assert not offenders, f"these modules load the GPU stack at import: {offenders}"


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("folder", ["pipeline/contract", "bot"])
def test_no_gpu_library_is_imported_even_inside_a_function(folder: str) -> None:
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        where = path.relative_to(REPO).as_posix()
        if where.startswith(OUTSIDE_THE_BOT_PROCESS):
            continue
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in HEAVY:
                bad.append(f"{where}:{line} imports {module}")
            elif top == "pipeline" and not module.startswith(BOT_MAY_IMPORT):
                bad.append(f"{where}:{line} imports worker-side {module}")
    assert not bad, "\n".join(bad)


def test_the_pipeline_never_imports_the_bot() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sorted((REPO / "pipeline").rglob("*.py"))
        for line, module in _imports(path)
        if module.split(".")[0] == "bot"
    ]
    assert not bad, "\n".join(bad)


def test_nothing_but_the_cli_imports_the_cli() -> None:
    # The CLI may import both layers; the bot and the engine never import it.
    bad = []
    for folder in ("bot", "pipeline"):
        for path in sorted((REPO / folder).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            if where.startswith("bot/cli/"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if any(n == "bot.cli" or n.startswith("bot.cli.") for n in names):
                    bad.append(f"{where}:{node.lineno} imports the CLI")
    assert len(list((REPO / "bot" / "cli").glob("*.py"))) > 3  # the CLI package is there
    assert not bad, "\n".join(bad)


# Inside bot/: what each room may import of the bot (docs/ARCHITECTURE.md, "What may
# import what"). A room always may import itself; the CLI may import anything.
ROOMS: dict[str, tuple[str, ...]] = {
    "bot/store/": (),
    "bot/plumbing/": ("bot.errors",),
    "bot/views/": ("bot.errors", "bot.app"),  # bot.app: the client's type, for hints
    "bot/photo_helper/process.py": ("bot.errors", "bot.photo_helper.work"),
    "bot/photo_helper/work.py": (),
    "bot/services/": (
        "bot.store",
        "bot.plumbing",
        "bot.views",
        "bot.photo_helper",
        "bot.errors",
    ),
    "bot/cogs/": (
        "bot.services",
        "bot.store",
        "bot.plumbing",
        "bot.views",
        "bot.photo_helper",
        "bot.errors",
        "bot.app",
    ),
    "bot/errors.py": ("bot.store", "bot.plumbing"),
    "bot/app.py": ("bot.cogs", "bot.services", "bot.plumbing", "bot.views", "bot.errors"),
    "bot/launcher.py": ("bot.app", "bot.services", "bot.store", "bot.plumbing"),
}
# Everything the photo helper's work may import, inside its functions (the doc's list).
PHOTO_HELPER_IMPORTS = (
    "__future__",
    "io",
    "typing",
    "pipeline.contract",
    "pipeline.faces.detection",
    "pipeline.safety.detector",
    "pipeline.training.dataset",
    "pipeline.loras.formats",
    "safetensors.torch",
)


def _bot_imports(path: Path) -> list[tuple[int, str]]:
    """The bot modules a file imports (``from bot import store`` is ``bot.store``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("bot.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "bot":
                found += [(node.lineno, f"bot.{a.name}") for a in node.names]
            elif node.module.startswith("bot."):
                found.append((node.lineno, node.module))
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_every_bot_module_lives_in_a_room() -> None:
    loose = [
        p.relative_to(REPO).as_posix()
        for p in sorted((REPO / "bot").glob("*.py"))
        if p.name != "__init__.py" and p.relative_to(REPO).as_posix() not in ROOMS
    ]
    assert not loose, f"modules at bot/'s root that no room lists: {loose}"


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_each_room_imports_only_what_the_architecture_allows(room: str) -> None:
    paths = sorted((REPO / room).rglob("*.py")) if room.endswith("/") else [REPO / room]
    assert paths and all(p.exists() for p in paths)
    own = room.rstrip("/").removesuffix(".py").replace("/", ".")
    allowed = (own, *ROOMS[room])
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in paths
        for line, module in _bot_imports(path)
        if not _within(module, allowed)
    ]
    assert not bad, "\n".join(bad)


def test_the_store_imports_nothing_of_the_bot() -> None:
    modules = _modules("bot/store")
    assert len(modules) > 8  # every section was found
    for path in sorted((REPO / "bot" / "store").rglob("*.py")):
        outside = [m for _, m in _bot_imports(path) if not _within(m, ("bot.store",))]
        assert not outside, f"{path.relative_to(REPO)} imports {outside}"


def test_the_photo_helper_imports_what_the_architecture_says() -> None:
    work = REPO / "bot" / "photo_helper" / "work.py"
    imported = {module for _, module in _imports(work)}
    assert "pipeline.training.dataset" in imported  # the static pass sees function bodies
    assert not {m for m in imported if not _within(m, PHOTO_HELPER_IMPORTS)}
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    row = next(line for line in doc.splitlines() if line.startswith("| `bot/photo_helper/work"))
    named = [m for m in PHOTO_HELPER_IMPORTS if "." in m or m == "safetensors.torch"]
    assert all(f"`{m}`" in row for m in named), f"the doc's row differs from the test: {row}"
