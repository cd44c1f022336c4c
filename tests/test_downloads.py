"""Downloads of Hub models (issue 26): `sdbot doctor --download` and a worker's first load
of a Hub id, against a Hub served on 127.0.0.1 (tests/hub_server.py: the endpoints and
headers huggingface_hub 2.4 calls). The repository is a tiny model folder as diffusers'
`save_pretrained` writes it, three times over: fp32 `.safetensors`, the `fp16` variant
and `.bin` pickles, as Hub repositories of SD 1.5 and SDXL hold them.

huggingface_hub reads HF_ENDPOINT and HF_HUB_CACHE once, when it is imported: the
downloads run in processes started with them set (the CLI; the pool's worker)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

from bot import store
from pipeline.contract.config import config_from_dict
from pipeline.contract.families import ModelError
from pipeline.contract.hub_files import disk_problem, is_hub_id, select_files
from pipeline.contract.jobs import Done, Progress
from pipeline.workers.local_pool import LocalPool
from tests import botkit
from tests.botkit import custom_ids, emu  # noqa: F401 - the Discord emulator fixture
from tests.hub_server import running_hub
from tests.test_runner import make_config, one_cpu_thread_per_worker, small
from tests.test_train_cli import run_cli

REPO_ID = "test/tiny-sd"
PLAIN = {
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
}
HALF = {path.replace(".safetensors", ".fp16.safetensors") for path in PLAIN}
CONFIGS = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hub_folder(tiny_sd: Path, tmp_path_factory) -> Path:
    """The tiny model as a Hub repository keeps it: fp32, fp16 variant and .bin files."""
    import torch
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("hub") / "tiny-sd"
    shutil.copytree(tiny_sd, folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.save_pretrained(folder, safe_serialization=False)  # the .bin pickles
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    return folder


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def download(
    hub,
    tmp_path: Path,
    *args: str,
    model: str = REPO_ID,
    dtype: str = "auto",
    only: bool = True,
    lines: str = "",
):
    """`sdbot doctor --download [args]` (`only=False`: `sdbot doctor`) with a config
    holding `model` from the hub (or `[models.tiny]` as `lines` say)."""
    config = tmp_path / "config.toml"
    lines = lines or f'source = "{model}"'
    config.write_text(
        f'[models.tiny]\n{lines}\n\n[storage]\ndata_dir = "{tmp_path / "data"}"\n\n'
        f'[workers]\ndevices = ["cpu"]\ndtype = "{dtype}"\n'
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    return run_cli(
        ["--config", str(config), "doctor", *(["--download"] if only else []), *args],
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


def snapshot(tmp_path: Path, repo: str = REPO_ID) -> Path:
    snapshots = tmp_path / "cache" / f"models--{repo.replace('/', '--')}" / "snapshots"
    (folder,) = snapshots.iterdir()
    return folder


# -- which files ----------------------------------------------------------------------------

# The shape of runwayml/stable-diffusion-v1-5's file list (sizes rounded): the same weights
# as fp32 and fp16, .bin and .safetensors, EMA-only and non-EMA, single-file checkpoints at
# the root, and a safety checker the bot never loads.
SD15_LISTING = {
    ".gitattributes": 1_500,
    "README.md": 14_000,
    "model_index.json": 541,
    "v1-5-pruned-emaonly.ckpt": 4_265_380_512,
    "v1-5-pruned-emaonly.safetensors": 4_265_146_304,
    "v1-5-pruned.ckpt": 7_703_807_346,
    "v1-5-pruned.safetensors": 7_703_324_286,
    "feature_extractor/preprocessor_config.json": 342,
    "safety_checker/config.json": 4_723,
    "safety_checker/model.fp16.safetensors": 608_016_280,
    "safety_checker/model.safetensors": 1_215_981_830,
    "safety_checker/pytorch_model.bin": 1_216_064_769,
    "safety_checker/pytorch_model.fp16.bin": 608_103_564,
    "scheduler/scheduler_config.json": 308,
    "text_encoder/config.json": 617,
    "text_encoder/model.fp16.safetensors": 246_144_152,
    "text_encoder/model.safetensors": 492_265_874,
    "text_encoder/pytorch_model.bin": 492_305_335,
    "text_encoder/pytorch_model.fp16.bin": 246_187_076,
    "tokenizer/merges.txt": 524_619,
    "tokenizer/special_tokens_map.json": 472,
    "tokenizer/tokenizer_config.json": 806,
    "tokenizer/vocab.json": 1_059_962,
    "unet/config.json": 743,
    "unet/diffusion_pytorch_model.bin": 3_438_375_973,
    "unet/diffusion_pytorch_model.fp16.bin": 1_719_327_893,
    "unet/diffusion_pytorch_model.fp16.safetensors": 1_719_125_304,
    "unet/diffusion_pytorch_model.non_ema.bin": 3_438_375_973,
    "unet/diffusion_pytorch_model.non_ema.safetensors": 3_438_167_536,
    "unet/diffusion_pytorch_model.safetensors": 3_438_167_536,
    "vae/config.json": 547,
    "vae/diffusion_pytorch_model.bin": 334_707_217,
    "vae/diffusion_pytorch_model.fp16.bin": 167_405_651,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167_335_342,
    "vae/diffusion_pytorch_model.safetensors": 334_643_268,
}
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def test_one_set_of_weights_of_the_loaded_components_is_selected():
    half = select_files(SD15_LISTING, SD15_INDEX, half=True, skip=["safety_checker"])
    weights = {p for p in half.files if p.endswith((".safetensors", ".bin", ".ckpt"))}
    assert half.variant == "fp16"
    assert weights == {
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    }
    assert "feature_extractor/preprocessor_config.json" in half.files
    assert not any(p.startswith("safety_checker/") for p in half.files)
    assert 2.1e9 < half.total < 2.2e9  # of the repository's 44 GB
    full = select_files(SD15_LISTING, SD15_INDEX, half=False, skip=["safety_checker"])
    assert full.variant == "" and "unet/diffusion_pytorch_model.safetensors" in full.files
    assert not any(".fp16." in p or "non_ema" in p or p.endswith(".bin") for p in full.files)


def test_bin_only_sharded_and_variant_only_repositories():
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    sharded = {
        "model_index.json": 1,
        "flux1-dev.safetensors": 23_800_000_000,  # the single file at the root: not fetched
        "transformer/config.json": 1,
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors": 9_962_580_296,
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors": 9_949_328_904,
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors": 3_870_584_832,
        "transformer/diffusion_pytorch_model.safetensors.index.json": 121_262,
    }
    chosen = select_files(sharded, index, half=True)
    assert chosen.variant == "" and len(chosen.files) == 6  # no fp16 variant: the plain shards
    assert "flux1-dev.safetensors" not in chosen.files
    pickles = {"model_index.json": 1, "transformer/diffusion_pytorch_model.bin": 5}
    assert (
        "transformer/diffusion_pytorch_model.bin" in select_files(pickles, index, half=False).files
    )
    only_half = {"model_index.json": 1, "transformer/diffusion_pytorch_model.fp16.safetensors": 5}
    assert select_files(only_half, index, half=False).variant == "fp16"
    with pytest.raises(ModelError, match="transformer"):
        select_files({"model_index.json": 1, "transformer/x.ckpt": 5}, index, half=False)


def test_hub_ids_and_the_disk_line(tmp_path):
    assert is_hub_id("black-forest-labs/FLUX.1-dev") and not is_hub_id(str(tmp_path))
    assert not is_hub_id("models/x.safetensors") and not is_hub_id("./a/b")
    line = disk_problem("flux", 25 * 2**30, 10 * 2**30, "/cache")
    assert line == (
        "model 'flux' needs 25.0 GB more on disk in /cache, which has 10.0 GB free (and "
        "1.0 GB is kept spare); free some space or set HF_HUB_CACHE to a folder on a larger disk"
    )
    assert disk_problem("flux", 2**30, 10 * 2**30, "/cache") is None


# -- sdbot doctor --download ------------------------------------------------------------------


def test_doctor_download_fetches_only_what_the_model_loads(hub_folder, tmp_path):
    with running_hub() as hub:
        hub.add_folder(REPO_ID, hub_folder)
        hub.page_size = 4  # the tree listing comes in pages, as the Hub's does
        first = download(hub, tmp_path)
        content_gets = [r for r in hub.requests if r[0] == "GET" and "/api/" not in r[1]]
        again = download(hub, tmp_path)
        gets_again = [r for r in hub.requests if r[0] == "GET" and "/api/" not in r[1]]
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("[ok  ] download tiny: needs ") and "free there" in lines[0]
    assert str(tmp_path / "cache") in lines[0]
    per_file = [line.strip() for line in lines[1:-1]]
    # A line per file fetched: its size, speed, and the whole download's progress.
    assert {line.split()[0] for line in per_file} == (PLAIN | CONFIGS) - {"model_index.json"}
    assert all(" at " in line and "/s; " in line and " of " in line for line in per_file)
    assert lines[-1].startswith("[ok  ] download tiny: test/tiny-sd in ")
    folder = snapshot(tmp_path)
    assert files_in(folder) == PLAIN | CONFIGS  # no fp16 duplicates, no .bin pickles
    for name in PLAIN | CONFIGS:
        assert (folder / name).read_bytes() == (hub_folder / name).read_bytes(), name
    assert len(content_gets) == len(PLAIN | CONFIGS)  # each file fetched once
    # Again: everything is in the cache, nothing is fetched.
    assert again.returncode == 0 and "0 KB fetched" in again.stdout, again.stdout
    assert gets_again == content_gets


def test_an_interrupted_download_resumes(hub_folder, tmp_path):
    big = "unet/diffusion_pytorch_model.safetensors"
    repo = tmp_path / "repo"
    shutil.copytree(hub_folder, repo, ignore=shutil.ignore_patterns(big))
    size = 24 * 2**20  # over huggingface_hub's 10 MB download chunk
    with running_hub() as hub:
        hub.add_folder("test/big", repo, declared={big: size})
        # The connection drops 15 MB into the file: huggingface_hub asks for the rest
        # with a Range request, from the last chunk it wrote.
        hub.cut_once[big] = 15 * 2**20
        # And the VAE's server fails: the first run stops there, in one line.
        hub.failing.add("vae/diffusion_pytorch_model.safetensors")
        failed = download(hub, tmp_path, model="test/big")
        before = list(hub.requests)
        hub.failing.clear()
        resumed = download(hub, tmp_path, model="test/big")
        after = hub.requests[len(before) :]
        unet_ranges = hub.gets(big)
    assert failed.returncode == 1
    (line,) = [line for line in failed.stdout.splitlines() if line.startswith("[FAIL]")]
    assert line.startswith("[FAIL] download tiny: model 'test/big'"), failed.stdout
    assert unet_ranges == ["", f"bytes={10 * 2**20}-"]  # in the first run only
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    fetched_again = {url for method, url, _ in after if method == "GET" and "/api/" not in url}
    assert len(fetched_again) == 1 and next(iter(fetched_again)).startswith("/cdn/")  # the VAE
    blob = (snapshot(tmp_path, "test/big") / big).read_bytes()
    assert (
        len(blob) == size and hashlib.sha256(blob).digest() == hashlib.sha256(bytes(size)).digest()
    )


def test_a_full_disk_is_one_line_before_anything_is_fetched(hub_folder, tmp_path):
    free = shutil.disk_usage(tmp_path).free
    huge = "unet/diffusion_pytorch_model.safetensors"
    repo = tmp_path / "repo"
    shutil.copytree(hub_folder, repo, ignore=shutil.ignore_patterns(huge))
    with running_hub() as hub:
        hub.add_folder("test/huge", repo, declared={huge: free + 2**40})
        (tmp_path / "run").mkdir()
        result = download(hub, tmp_path / "run", model="test/huge")
        fetched = [url for method, url, _ in hub.requests if method == "GET" and "/cdn/" in url]
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("[FAIL]")]
    assert "needs" in line and "free" in line and "HF_HUB_CACHE" in line, line
    assert str(tmp_path / "run" / "cache") in line
    assert fetched == []  # the weights were never asked for


def test_an_unreachable_hub_is_one_line(tmp_path):
    with running_hub() as hub:
        pass  # stopped: nothing listens on its port any more
    result = download(hub, tmp_path)
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("[FAIL]")]
    assert line.startswith(
        "[FAIL] download tiny: model 'test/tiny-sd' is not in the local Hugging Face cache and "
        "the Hub cannot be reached"
    ), line


def test_an_unknown_repository_is_one_line(tmp_path):
    with running_hub() as hub:
        result = download(hub, tmp_path, model="test/nothing")
    assert result.returncode == 1
    assert "[FAIL] download tiny: model 'test/nothing': no such repository" in result.stdout


def test_doctor_downloads_a_hub_model_then_loads_it(hub_folder, tmp_path):
    """Plain `sdbot doctor` fetches a Hub model as a worker would (here a half-precision
    one: the fp16 variant) and loads it from the snapshot folder."""
    with running_hub() as hub:
        hub.add_folder(REPO_ID, hub_folder)
        result = download(hub, tmp_path, dtype="bfloat16", only=False)
    lines = result.stdout.splitlines()
    assert any(line.startswith("[ok  ] download tiny: needs ") for line in lines), result.stdout
    assert any(
        line.startswith("[ok  ] download tiny: test/tiny-sd (fp16 weights) in ") for line in lines
    )
    assert any(line.startswith("[ok  ] model tiny: sd1 from test/tiny-sd, hash ") for line in lines)
    assert files_in(snapshot(tmp_path)) == HALF | CONFIGS


# -- the worker's first load -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_worker_downloads_a_hub_model_with_progress_events(
    hub_folder, tiny_sd, tmp_path, monkeypatch
):
    with running_hub() as hub:
        hub.add_folder(REPO_ID, hub_folder)
        # The spawned worker reads these when it imports huggingface_hub.
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        # bfloat16 (half precision) on the CPU worker: the fp16 variant is what it fetches.
        models = {"local": tiny_sd, "hub": Path(REPO_ID)}
        config = make_config(models, tmp_path / "data", dtype="bfloat16")
        pool = LocalPool(config)
        with one_cpu_thread_per_worker():
            await pool.start()
            try:
                events = [e async for e in pool.run([("h1", small(model="hub"))])]
                for _ in range(300):  # what it holds is reported just after the batch
                    memory = {m: w.memory[m] for w in pool.workers() for m in w.memory}
                    if "hub" in memory:
                        break
                    await asyncio.sleep(0.1)
            finally:
                await pool.close()
    messages = [e.message for e in events if isinstance(e, Progress) and e.message]
    assert messages and all(m.startswith("downloading the model, ") for m in messages)
    done, total = re.fullmatch(
        r"downloading the model, ([\d.]+) of ([\d.]+) MB", messages[-1]
    ).groups()
    assert done == total and float(total) > 1, messages  # the last file's end: all of it
    assert isinstance(events[-1], Done) and len(events[-1].images) == 1
    folder = snapshot(tmp_path)
    assert files_in(folder) == HALF | CONFIGS
    assert memory["hub"].plan == "full" and memory["hub"].estimated_bytes > 0


UNET = "unet/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"


@contextlib.asynccontextmanager
async def _bot_with_hub(emu, hub_folder, tiny_sd, tmp_path, monkeypatch, *, hold=False):  # noqa: F811
    """The bot with one worker and a Hub model "hub" (`hold`: whose UNet weights the hub
    sends half of, then holds until the test releases them: `hub.held`, `hub.release`)."""
    with running_hub() as hub:
        hub.add_folder(REPO_ID, hub_folder)
        if hold:
            hub.hold_at[UNET] = (hub_folder / UNET).stat().st_size // 2
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        # The hold lasts as long as the test needs: no read timeout and retry meanwhile.
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "300")
        hub_model = {"hub": {"source": REPO_ID, "family": "sd1"}}
        config = botkit.make_config(tiny_sd, tmp_path / "data", emu, models=hub_model)
        pool = LocalPool(config)
        with one_cpu_thread_per_worker():
            await pool.start()
            try:
                async with botkit.running_sdbot(config, pool):
                    yield hub, pool, store.open_db(config.storage.database)
            finally:
                await pool.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_the_member_reads_the_download_in_the_progress_message(
    emu,
    hub_folder,
    tiny_sd,
    tmp_path,
    monkeypatch,  # noqa: F811
):
    async with _bot_with_hub(emu, hub_folder, tiny_sd, tmp_path, monkeypatch):
        record = await botkit.imagine(emu, "a lighthouse", model="hub")
        job = await botkit.queued_job(record)
        await botkit.wait_result(emu, job)
    edits = [
        r.json.get("content", "")
        for r in emu.requests_to("PATCH", r"/channels/\d+/messages/\d+$")
        if isinstance(r.json, dict)
    ]
    shown = [text for text in edits if "Downloading the model, " in text]
    assert shown, edits
    assert re.search(r"\nDownloading the model, [\d.]+ of [\d.]+ MB…$", shown[-1]), shown[-1]


# -- what else a model loads from the Hub: a single file's base, an inpainting model ----------


def test_a_single_file_takes_configs_only_of_what_it_holds():
    """Of a single file's base only what the file lacks: every configuration, and weights
    only of the components the file does not bring."""
    held = {"unet", "vae", "text_encoder"}  # an SD 1.5 checkpoint brings all three
    chosen = select_files(
        SD15_LISTING, SD15_INDEX, half=True, skip=["safety_checker"], configs_only=held
    )
    assert chosen.variant == ""
    assert not any(p.endswith((".safetensors", ".bin", ".ckpt")) for p in chosen.files)
    assert {"unet/config.json", "vae/config.json", "text_encoder/config.json"} <= set(chosen.files)
    assert "tokenizer/vocab.json" in chosen.files and "scheduler/scheduler_config.json" in (
        chosen.files
    )
    unet_only = select_files(
        SD15_LISTING, SD15_INDEX, half=True, skip=["safety_checker"], configs_only={"unet"}
    )
    weights = {p for p in unet_only.files if p.endswith(".safetensors")}
    assert weights == {
        "text_encoder/model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    }


def _weights_fetched(hub, repo: str) -> set[str]:
    """The weights files of `repo` whose content was asked of the hub (by content: with
    one repository on the hub)."""
    paths = {p for p in hub.repos[repo].files if p.endswith((".safetensors", ".bin"))}
    return {p for p in paths if hub.gets(p)}


def _needed(line: str) -> str:
    return re.search(r"needs (\S+ \S+) in ", line).group(1)


@pytest.fixture(scope="module")
def sd_checkpoint(tiny_sd, tmp_path_factory) -> Path:
    """The tiny SD 1.x model as an A1111 single file (UNet, VAE and text encoder)."""
    from pipeline.contract.config import ModelConfig
    from pipeline.models.loading import load_model
    from pipeline.models.single_file import export_single_file

    pipe = load_model(ModelConfig("tiny", str(tiny_sd)), device="cpu").pipe
    return export_single_file(pipe, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_a_checkpoint_s_base_and_an_inpainting_model_come_through_our_downloader(
    hub_folder, sd_checkpoint, tiny_inpaint, tmp_path
):
    """An SD 1.x single file with `single_file_config` and `inpaint_source` given as Hub
    ids: one disk line for both, a line per file, only the base's configurations (the
    file brings the UNet, VAE and text encoder), the inpainting model's loaded files; the
    model then loads from the snapshots, diffusers fetching nothing of its own."""
    from pipeline.contract.memory_plan import size_text

    lines = (
        f'source = "{sd_checkpoint}"\nsingle_file_config = "{REPO_ID}"\n'
        'inpaint_source = "test/tiny-inpaint"'
    )
    with running_hub() as hub:
        hub.add_folder(REPO_ID, hub_folder)
        hub.add_folder("test/tiny-inpaint", tiny_inpaint)
        result = download(hub, tmp_path, lines=lines, only=False)
        requests = len(hub.requests)
        again = download(hub, tmp_path, lines=lines)
        fetched_again = [
            r for r in hub.requests[requests:] if r[0] == "GET" and "/api/" not in r[1]
        ]
    out = result.stdout.splitlines()
    base, inpaint = snapshot(tmp_path), snapshot(tmp_path, "test/tiny-inpaint")
    assert files_in(base) == CONFIGS
    assert files_in(inpaint) == files_in(tiny_inpaint)
    (disk,) = [line for line in out if line.startswith("[ok  ] download tiny: needs ")]
    # model_index.json of each is read before the disk is checked: the rest is counted.
    counted = [base / p for p in CONFIGS] + [inpaint / p for p in files_in(inpaint)]
    needed = sum(p.stat().st_size for p in counted if p.name != "model_index.json")
    assert _needed(disk) == size_text(needed), disk
    per_file = [line.strip().split()[0] for line in out if line.startswith("       ")]
    assert sorted(per_file) == sorted(
        [p for p in CONFIGS if p != "model_index.json"]
        + [p for p in files_in(tiny_inpaint) if p != "model_index.json"]
    )
    (done,) = [line for line in out if line.startswith("[ok  ] download tiny: single_file")]
    assert f"single_file_config {REPO_ID} in {base}" in done
    assert f"inpaint_source test/tiny-inpaint in {inpaint}" in done
    assert any(line.startswith("[ok  ] model tiny: sd1 from ") for line in out), result.stdout
    assert again.returncode == 0 and "0 KB fetched" in again.stdout, again.stdout
    assert fetched_again == []


@pytest.mark.asyncio
async def test_a_worker_fetches_a_checkpoint_s_base_before_loading_it(
    hub_folder, sd_checkpoint, tiny_sd, tmp_path, monkeypatch
):
    """The worker's first load of a single file whose `single_file_config` is a Hub id:
    the member's progress says the download, only the base's configurations come down,
    and the job is drawn."""
    with running_hub() as hub:
        hub.add_folder(REPO_ID, hub_folder)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        ckpt = {"source": str(sd_checkpoint), "single_file_config": REPO_ID}
        config = config_from_dict(
            {
                # The worker loads the first (default) model at start, the other on its job.
                "models": {"local": {"source": str(tiny_sd)}, "ckpt": ckpt},
                "storage": {"data_dir": str(tmp_path / "data")},
                "workers": {"backend": "local", "devices": ["cpu"]},
            }
        )
        pool = LocalPool(config)
        with one_cpu_thread_per_worker():
            await pool.start()
            try:
                events = [e async for e in pool.run([("c1", small(model="ckpt"))])]
            finally:
                await pool.close()
    messages = [e.message for e in events if isinstance(e, Progress) and e.message]
    assert messages and all(m.startswith("downloading the model, ") for m in messages)
    assert isinstance(events[-1], Done) and len(events[-1].images) == 1, events[-1]
    assert files_in(snapshot(tmp_path)) == CONFIGS


def test_a_flux_transformer_file_takes_the_rest_of_its_base_from_the_hub(tmp_path):
    """A GGUF Flux.1 transformer with its base as a Hub id: the base's text encoders, VAE,
    tokenizers and configs are fetched, its transformer weights never (the file replaces
    them), and the model loads."""
    pytest.importorskip("gguf")
    from diffusers import FluxTransformer2DModel

    from pipeline.families.flux_tiny import write_tiny_flux
    from tests.gguf_files import write_gguf

    base = write_tiny_flux(tmp_path / "flux-base")
    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer")
    gguf = write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", transformer.state_dict())
    lines = f'source = "{gguf}"\nfamily = "flux"\nsingle_file_config = "test/tiny-flux"'
    with running_hub() as hub:
        hub.add_folder("test/tiny-flux", base)
        result = download(hub, tmp_path, lines=lines, only=False)
        weights = _weights_fetched(hub, "test/tiny-flux")
    out = result.stdout.splitlines()
    replaced = "transformer/diffusion_pytorch_model.safetensors"
    assert files_in(snapshot(tmp_path, "test/tiny-flux")) == files_in(base) - {replaced}
    assert replaced not in weights and len(weights) == 3  # two text encoders, the VAE
    assert any(line.startswith("[ok  ] download tiny: needs ") for line in out), result.stdout
    assert any(line.startswith("[ok  ] model tiny: flux from ") for line in out), result.stdout


# -- a cancel while the worker downloads the model ------------------------------------------


async def _downloading_job(emu, hub) -> tuple[str, dict]:
    """A job for the Hub model, once its worker is half way through the UNet's weights;
    and its progress message."""
    job = await botkit.queued_job(await botkit.imagine(emu, "a lighthouse", model="hub"))
    assert await asyncio.to_thread(hub.held.wait, 120), "the download never reached the UNet"
    progress = await emu.wait_for(
        lambda: next(
            (m for m in emu.channel_messages() if f"sdbot:cancel:{job}" in custom_ids(m)), None
        ),
        30,
    )
    return job, progress


@pytest.mark.asyncio(loop_scope="session")
async def test_a_cancel_during_the_download_ends_the_job_at_once_and_stops_it(
    emu,
    hub_folder,
    tiny_sd,
    tmp_path,
    monkeypatch,  # noqa: F811
):
    """Nothing else waits for the model: the member is answered while the UNet is still
    half sent, and the download stops there; the worker is free for the next job."""
    async with _bot_with_hub(emu, hub_folder, tiny_sd, tmp_path, monkeypatch, hold=True) as (
        hub,
        pool,
        db,
    ):
        job, progress = await _downloading_job(emu, hub)
        answer = await botkit.reply(await emu.send_command("cancel", {"job": job}))
        # Answered, ended and shown while the hub still holds the rest of the UNet.
        status = store.get_job(db, job)["status"]
        await emu.wait_for(lambda: "Cancelled." in emu.get_message(progress["id"])["content"], 30)
        unet_while_cancelled = list((tmp_path / "cache").rglob(UNET))
        hub.release.set()
        await emu.wait_for(lambda: pool.free_workers() == 1, 120)
        vae_gets = hub.gets(VAE)
        other = await botkit.queued_job(await botkit.imagine(emu, "a castle"))
        await botkit.wait_result(emu, other)
    assert answer["content"] == f"Cancelled `{job}`." and answer["flags"] & 64
    assert status == "cancelled" and unet_while_cancelled == []
    # The download stopped: the UNet never completed, the VAE after it was never asked for.
    assert list((tmp_path / "cache").rglob(UNET)) == [] and vae_gets == []
    assert store.get_job(db, job)["status"] == "cancelled"
    assert botkit.result_messages(emu, job) == []


@pytest.mark.asyncio(loop_scope="session")
async def test_a_cancel_during_the_download_keeps_it_for_the_next_job_of_that_model(
    emu,
    hub_folder,
    tiny_sd,
    tmp_path,
    monkeypatch,  # noqa: F811
):
    """Another job waits for the model: the cancelled job ends at once all the same, the
    download goes on (the UNet fetched once, never restarted), the waiting job runs."""
    async with _bot_with_hub(emu, hub_folder, tiny_sd, tmp_path, monkeypatch, hold=True) as (
        hub,
        pool,
        db,
    ):
        job, progress = await _downloading_job(emu, hub)
        waiting = await botkit.queued_job(await botkit.imagine(emu, "a castle", model="hub"))
        answer = await botkit.reply(await emu.send_command("cancel", {"job": job}))
        status = store.get_job(db, job)["status"]
        await emu.wait_for(lambda: "Cancelled." in emu.get_message(progress["id"])["content"], 30)
        hub.release.set()
        await botkit.wait_result(emu, waiting)
    assert answer["content"] == f"Cancelled `{job}`." and status == "cancelled"
    assert hub.gets(UNET) == [""]  # one GET, no Range: the download was never restarted
    assert store.get_job(db, job)["status"] == "cancelled"
    assert botkit.result_messages(emu, job) == []
