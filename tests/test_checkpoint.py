"""Tests for ldm.checkpoint: the key map (both ways, against diffusers' own converter), reading
.safetensors / .ckpt / diffusers folders, memory mapping, refusing unsafe pickles, family
detection, clear errors for broken files, and strict per-stage loading."""
from __future__ import annotations

import gc
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import ref_checkpoint as ref
from ldm import checkpoint as ck
from ldm import families

REFERENCE = Path(__file__).parent / "reference" / "checkpoint_tiny.safetensors"


def assert_same_state_dict(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for k in expected:
        assert_close(actual[k], expected[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


# --- the key map ------------------------------------------------------------------------------
def test_key_map_table_rows_follow_the_sd1_block_structure():
    rows = {d: (c, inner) for d, c, inner in ck.DIFFUSERS_TO_COMPVIS["unet"]}
    assert rows["down_blocks.1.attentions.0"] == ("input_blocks.4.1", "")
    assert rows["down_blocks.2.downsamplers.0.conv"] == ("input_blocks.9.0.op", "")
    assert rows["down_blocks.3.resnets.1"] == ("input_blocks.11.0", "unet_resnet")
    assert rows["up_blocks.0.upsamplers.0.conv"] == ("output_blocks.2.1.conv", "")   # no attention at level 3
    assert rows["up_blocks.1.upsamplers.0.conv"] == ("output_blocks.5.2.conv", "")
    assert "up_blocks.3.upsamplers.0.conv" not in rows and "down_blocks.3.attentions.0" not in rows
    vae = {d: c for d, c, _ in ck.DIFFUSERS_TO_COMPVIS["vae"]}
    assert vae["decoder.up_blocks.0.resnets.2"] == "decoder.up.3.block.2"
    assert vae["decoder.up_blocks.3.resnets.0"] == "decoder.up.0.block.0"
    text = ck.format_key_map()
    assert "down_blocks.0.resnets.0" in text and "in_layers.0" in text and "nin_shortcut" in text


def test_key_map_config_from_diffusers_configs():
    unet, vae, _ = ref.diffusers_models("tiny")
    assert ck.KeyMapConfig.from_diffusers(dict(unet.config), dict(vae.config)) == ck.KeyMapConfig.tiny()
    with pytest.raises(ck.CheckpointError, match="mirror"):
        ck.KeyMapConfig.from_diffusers({**unet.config, "up_block_types": ["UpBlock2D"] * 3}, dict(vae.config))


def _diffusers_round_trip(size: str) -> None:
    """diffusers names -> our table -> CompVis file -> diffusers' converter -> the original names and tensors."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    unet, vae, _ = ref.diffusers_models(size)
    original = ref.diffusers_state_dicts(size)
    stages = {s: ck.diffusers_to_compvis(s, sd, ref.TABLES[size]) for s, sd in original.items()}
    single = ref.single_file(stages, extras=True)     # EMA and buffers must not confuse the converter
    back = {"unet": convert_ldm_unet_checkpoint(single, dict(unet.config)),
            "vae": convert_ldm_vae_checkpoint(single, dict(vae.config)),
            "text_encoder": {k.removeprefix("text_model."): t for k, t in convert_ldm_clip_checkpoint(single).items()
                             if not k.endswith("position_ids")}}
    for stage in ck.STAGES:
        assert sorted(back[stage]) == sorted(original[stage]), stage
        for k, t in original[stage].items():
            assert back[stage][k].shape == t.shape, k
            if t.is_meta:      # full size: the converter must hand back the very tensor (or a view of it)
                assert back[stage][k] is t or stage == "vae" and "mid_block.attentions" in k, k
            else:
                assert_close(back[stage][k], t, rtol=0, atol=0)


def test_key_map_round_trip_through_diffusers_converter_tiny():
    _diffusers_round_trip("tiny")


@pytest.mark.full
def test_key_map_round_trip_through_diffusers_converter_full_size():
    _diffusers_round_trip("full")
    stages = ref.compvis_stages("full")
    assert {s: len(sd) for s, sd in stages.items()} == {"unet": 686, "vae": 248, "text_encoder": 196}
    vae = stages["vae"]
    assert (sum(k.startswith("encoder.") for k in vae), sum(k.startswith("decoder.") for k in vae)) == (106, 138)
    assert vae["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)   # CompVis: 1x1 convolutions
    full = ck.from_state_dict(ref.single_file(stages, extras=True))
    assert full.family == "sd1" and {s: len(sd) for s, sd in full.stages().items()} == \
        {"unet": 686, "vae": 248, "text_encoder": 196}
    assert full.ignored["model_ema"] == 686 + 2 and full.ignored["position_ids"] == 1


def test_key_map_against_stored_diffusers_conversion():
    """Without diffusers: our map inverts what diffusers' converter made of a tiny CompVis file."""
    stored = load_file(str(REFERENCE))
    inputs = {k.removeprefix("inputs."): t for k, t in stored.items() if k.startswith("inputs.")}
    table = ck.key_map(ck.KeyMapConfig.tiny())
    for stage in ck.STAGES:
        prefix = f"outputs.{stage}."
        converted = {k.removeprefix(prefix): t for k, t in stored.items() if k.startswith(prefix)}
        prefix = families.get("sd1").prefixes[stage]
        expected = {k.removeprefix(prefix): t for k, t in inputs.items() if k.startswith(prefix)}
        assert_same_state_dict(ck.diffusers_to_compvis(stage, converted, table), expected)


def test_key_map_reports_keys_without_a_row():
    with pytest.raises(ck.CheckpointError, match="no row in the key map.*add_embedding"):
        ck.diffusers_to_compvis("unet", {"add_embedding.linear_1.weight": torch.zeros(1)})


# --- single files ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_stages():
    return ref.compvis_stages("tiny")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_read_safetensors_keeps_the_file_dtype(tmp_path, tiny_stages, dtype):
    path = ref.write_safetensors(ref.single_file(tiny_stages), tmp_path / "m.safetensors", dtype)
    got = ck.read(path)
    assert (got.family, got.format, got.dtype, got.path) == ("sd1", "safetensors", dtype, path)
    for stage in ck.STAGES:
        assert_same_state_dict(got.stages()[stage], {k: t.to(dtype) for k, t in tiny_stages[stage].items()})
    assert got.ignored == {"model_ema": len(tiny_stages["unet"]) + 2, "position_ids": 1,
                           "other top-level (schedule buffers, ...)": 2}
    summary = got.summary()
    assert summary["stages"]["unet"]["tensors"] == len(tiny_stages["unet"])
    assert summary["stages"]["vae"]["bytes"] == sum(t.numel() * t.element_size() for t in got.vae.values())
    assert summary["dtype"] == str(dtype).removeprefix("torch.")


def test_read_casts_on_request_and_checks_the_dtype_argument(tmp_path, tiny_stages):
    path = ref.write_safetensors(ref.single_file(tiny_stages), tmp_path / "m.safetensors", torch.float16)
    got = ck.read(path, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert_close(got.unet["out.2.weight"], tiny_stages["unet"]["out.2.weight"].half().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dtype='float16'.*floating torch.dtype"):
        ck.read(path, dtype="float16")


def test_read_ema_weights_on_request(tmp_path, tiny_stages):
    path = ref.write_safetensors(ref.single_file(tiny_stages), tmp_path / "m.safetensors")
    assert_same_state_dict(ck.read(path, ema=True).unet, {k: t + 1 for k, t in tiny_stages["unet"].items()})
    pruned = ref.write_safetensors(ref.single_file(tiny_stages, extras=False), tmp_path / "pruned.safetensors")
    with pytest.raises(ck.CheckpointError, match="no EMA copy"):
        ck.read(pruned, ema=True)


def test_text_encoder_keys_without_text_model_prefix_are_accepted(tiny_stages):
    sd = ref.single_file(tiny_stages, extras=False)
    old = {k.replace("transformer.text_model.", "transformer."): t for k, t in sd.items()}
    assert_same_state_dict(ck.from_state_dict(old).text_encoder, tiny_stages["text_encoder"])


def test_inpainting_family_from_nine_input_channels(tmp_path):
    stages = ref.compvis_stages("tiny", in_channels=9)
    got = ck.read(ref.write_safetensors(ref.single_file(stages), tmp_path / "inpaint.safetensors"))
    assert got.family == "sd1-inpaint" and got.unet["input_blocks.0.0.weight"].shape[1] == 9


def test_read_lightning_ckpt_with_training_classes(tmp_path, tiny_stages):
    path = ref.write_lightning_ckpt(ref.single_file(tiny_stages), tmp_path / "sd.ckpt")
    with pytest.raises(pickle.UnpicklingError):        # the file really names classes weights_only refuses
        torch.load(path, weights_only=True)
    got = ck.read(path)
    assert (got.family, got.format) == ("sd1", "ckpt")
    for stage in ck.STAGES:
        assert_same_state_dict(got.stages()[stage], tiny_stages[stage])
    assert got.ignored["model_ema"] == len(tiny_stages["unet"]) + 2


def test_ckpt_fp16_and_shared_storage(tmp_path):
    base = torch.randn(4, 6)
    sd = {"a": base.half(), "b": base.half()[1:, ::2], "c": torch.arange(5), "d": torch.nn.Parameter(base)}
    torch.save(sd, tmp_path / "x.pt")
    obj, fmt = ck._read_file(tmp_path / "x.pt")
    assert fmt == "ckpt" and sorted(obj) == sorted(sd)
    for k in sd:
        assert_close(obj[k], sd[k].detach(), rtol=0, atol=0)
        assert obj[k].dtype == sd[k].dtype and obj[k].stride() == sd[k].stride()


@pytest.mark.parametrize("name", ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen",
                                  "builtins.__import__"])
def test_pickle_that_calls_code_is_refused_and_nothing_runs(tmp_path, name):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": ref.malicious_payloads(marker)[name]}, path)
    with pytest.raises(ck.UnsafeCheckpointError, match="unsafe pickle.*nothing was imported or executed"):
        ck.read(path)
    assert not marker.exists()


def test_malicious_payload_is_live_control(tmp_path):
    """Control for the test above: an ordinary unpickler does run the payload."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(ref.malicious_payloads(marker)["builtins.exec"]))
    assert marker.exists()


def test_safetensors_is_memory_mapped(tmp_path):
    """Reading and touching every tensor of a ~200 MB file adds far less than 200 MB of private
    memory: the tensors are views of the file's pages, not a copy."""
    path = tmp_path / "big.safetensors"
    ref.write_safetensors({f"model.diffusion_model.w{i}": torch.ones(1024, 1024) for i in range(50)}, path)
    gc.collect()
    before = _rss_anon_mib()
    obj, _ = ck._read_file(path)
    total = sum(float(t.sum()) for t in obj.values())
    grown = _rss_anon_mib() - before
    assert total == 50 * 1024 * 1024 and path.stat().st_size > 200e6
    assert grown < 20, f"private memory grew by {grown} MiB while reading a 200 MB file"


def test_ckpt_storages_are_memory_mapped(tmp_path):
    path = tmp_path / "big.ckpt"
    torch.save({f"w{i}": torch.ones(1024, 1024) for i in range(25)}, path)
    gc.collect()
    before = _rss_anon_mib()
    obj, _ = ck._read_file(path)
    total = sum(float(t.sum()) for t in obj.values())
    grown = _rss_anon_mib() - before
    assert total == 25 * 1024 * 1024
    assert grown < 20, f"private memory grew by {grown} MiB while reading a 100 MB .ckpt"


def _rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("needs /proc/self/status (Linux)")


# --- families and broken files ----------------------------------------------------------------
@pytest.mark.parametrize("name", ref.OTHER_FAMILIES)
def test_other_families_are_named_and_refused(tmp_path, name):
    assert tuple(ref.other_family_key_sets()) == ref.OTHER_FAMILIES
    sd, words = ref.other_family_key_sets()[name]
    path = tmp_path / f"{name}.ckpt"
    torch.save(sd, path)
    with pytest.raises(ck.CheckpointError) as err:
        ck.read(path)
    message = str(err.value)
    assert words in message and str(path) in message and "SD 1.x" in message, message


def _truncated(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("case", ["cut-safetensors-data", "cut-safetensors-header", "cut-ckpt", "random-bytes",
                                  "empty", "missing", "dir-without-index", "zip-without-pickle"])
def test_broken_files_give_a_clear_error_naming_the_file(tmp_path, tiny_stages, case):
    st = ref.write_safetensors(ref.single_file(tiny_stages, extras=False), tmp_path / "ok.safetensors")
    ckpt = tmp_path / "ok.ckpt"
    torch.save(ref.single_file(tiny_stages, extras=False), ckpt)
    path = tmp_path / case
    if case == "cut-safetensors-data":
        _truncated(st, path, 0.5)
    elif case == "cut-safetensors-header":
        _truncated(st, path, 0.001)
    elif case == "cut-ckpt":
        _truncated(ckpt, path, 0.7)
    elif case == "random-bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "dir-without-index":
        (path / "unet").mkdir(parents=True)
    elif case == "zip-without-pickle":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    with pytest.raises(ck.CheckpointError, match=str(path)) as err:
        ck.read(path)
    if case.startswith("cut-"):
        assert "truncated or corrupt" in str(err.value) and err.value.__cause__ is not None


# --- diffusers folders --------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["safetensors", "bin", "fp16"])
def test_diffusers_folder_reads_like_the_single_file(tmp_path, tiny_stages, weights):
    got = ck.read(ref.write_diffusers_folder(tmp_path / "sd", weights=weights))
    dtype = torch.float16 if weights == "fp16" else torch.float32
    assert (got.family, got.format, got.dtype) == ("sd1", "diffusers", dtype)
    for stage in ck.STAGES:
        assert_same_state_dict(got.stages()[stage], {k: t.to(dtype) for k, t in tiny_stages[stage].items()})
    assert got.vae["encoder.mid.attn_1.k.weight"].ndim == 4


def test_diffusers_folder_inpainting_and_missing_parts(tmp_path):
    folder = ref.write_diffusers_folder(tmp_path / "inpaint", in_channels=9)
    assert ck.read(folder).family == "sd1-inpaint"
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ck.CheckpointError, match="no weights in vae/"):
        ck.read(folder)


def test_diffusers_folder_of_other_families_is_refused(tmp_path):
    sd2 = ref.write_diffusers_folder(tmp_path / "sd2", use_linear_projection=True)   # SD 2.x: linear proj_in
    with pytest.raises(ck.CheckpointError, match="SD 2.x"):
        ck.read(sd2)
    index = sd2 / "model_index.json"
    index.write_text(index.read_text().replace("StableDiffusionPipeline", "StableDiffusionXLPipeline"))
    with pytest.raises(ck.CheckpointError, match="SDXL"):
        ck.read(sd2)


def test_diffusers_folder_legacy_vae_attention_names():
    """Older diffusers VAE files name the mid attention query/key/value/proj_attn."""
    legacy = {"encoder.mid_block.attentions.0.query.weight": torch.ones(4, 4),
              "encoder.mid_block.attentions.0.proj_attn.bias": torch.ones(4)}
    got = ck.diffusers_to_compvis("vae", legacy)
    assert got["encoder.mid.attn_1.q.weight"].shape == (4, 4, 1, 1)
    assert got["encoder.mid.attn_1.proj_out.bias"].shape == (4,)


# --- strict loading per stage ---------------------------------------------------------------
def test_load_stage_strict_and_lists_what_does_not_fit():
    module = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(12)])
    good = {k: torch.full_like(t, 3.0) for k, t in module.state_dict().items()}
    ck.load_stage(module, good, "vae", "sd1")
    assert_close(module[5].weight, torch.full((2, 2), 3.0))
    bad = {f"extra.{i}": torch.zeros(1) for i in range(3)}
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_stage(module, bad, "unet", "sd1-inpaint")
    message = str(err.value)
    assert "unet of a sd1-inpaint checkpoint" in message and "missing keys 24" in message
    assert "and 14 more" in message and "'extra.0'" in message
    wrong_shape = {**good, "0.weight": torch.zeros(3, 3)}
    with pytest.raises(ck.CheckpointError, match="size mismatch"):
        ck.load_stage(module, wrong_shape, "text_encoder", "sd1")
    with pytest.raises(ValueError, match="stage='clip'"):
        ck.load_stage(module, good, "clip", "sd1")


def test_an_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from ldm import weights
    from ldm.checkpoint import write

    te, unet, vae, configs = weights.random_models("tiny")

    def interrupted(sd, filename, metadata=None):
        open(filename, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        weights.write_single_file(tmp_path / "m.safetensors", te, unet, vae, configs=configs)
    assert list(tmp_path.iterdir()) == []


def test_two_writers_to_one_path_exactly_one_wins_and_nothing_is_overwritten(tmp_path):
    """write_new creates the target exclusively (os.link of a finished temporary file): a file that
    appears after the exists() check is never replaced, and two processes racing for one path (the
    old exists-then-rename gave two successes about 1 time in 3) end with one file and one
    FileExistsError, with no temporary file left behind."""
    import os
    import time

    from ldm.checkpoint.write import write_new

    target = tmp_path / "m.safetensors"

    def someone_else_wins(tmp):        # another process writes the target while we write ours
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")

    with pytest.raises(FileExistsError, match="another process wrote it first"):
        write_new(target, someone_else_wins)
    assert target.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]

    for attempt in range(3):           # a real race between two processes, released together
        path, go = tmp_path / f"race{attempt}.bin", tmp_path / f"go{attempt}"
        pids = []
        for who in (b"1", b"2"):
            pid = os.fork()
            if pid == 0:
                try:
                    while not go.exists():
                        time.sleep(0.001)
                    write_new(path, lambda tmp, who=who: (tmp.write_bytes(who * 1000), time.sleep(0.05)))
                    os._exit(0)
                except FileExistsError:
                    os._exit(17)
                except BaseException:  # noqa: BLE001
                    os._exit(1)
            pids.append(pid)
        go.touch()
        codes = sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids)
        assert codes == [0, 17], codes
        assert path.read_bytes() in (b"1" * 1000, b"2" * 1000)
        assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]
