"""Hostile checkpoint files: each one, a few bytes to a few MB built here with pickle opcodes,
zipfile or safetensors, must end in ldm's own one-line error (CheckpointError or
UnsafeCheckpointError) naming the file, within seconds and well under 1 GiB, with the process
left intact.

Every read runs in a forked child with a 1 GiB address-space limit above what it already maps
(resource.RLIMIT_AS) and a 20 s deadline, so a file that hangs the reader, exhausts memory or
crashes the interpreter fails its test instead of the test run.
"""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ref_checkpoint as ref
from bounded import run_bounded
from ldm import checkpoint, weights


def assert_clean_error(out: dict, path, unsafe: bool | None = None, match: str | None = None) -> str:
    """ldm's own error, one line, naming the file; the process intact (pathlib still works)."""
    assert out["path_ok"], "the read changed pathlib for the whole process"
    expected = {True: ("UnsafeCheckpointError",), False: ("CheckpointError",),
                None: ("CheckpointError", "UnsafeCheckpointError")}[unsafe]
    assert out["error"] in expected, f"{out['error']}: {out['message']}"
    message = out["message"]
    assert "\n" not in message, message
    assert str(path) in message, message
    assert len(message) < 1000, message
    if match is not None:
        assert match in message, message
    return message


def read_bounded(path, **kw) -> dict:
    return run_bounded(lambda: checkpoint.read(path, **kw))


# --- pickle opcodes --------------------------------------------------------------------------
P = pickle


def val(x) -> bytes:
    """The opcodes that push x (plain data), without protocol header, memo or STOP."""
    return pickletools.optimize(pickle.dumps(x, protocol=2))[2:-1]


def glob(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def pkl(*body: bytes) -> bytes:
    return P.PROTO + b"\x02" + b"".join(body) + P.STOP


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    return P.MARK + val("storage") + glob("torch", kind) + val(key) + val("cpu") + val(numel) + P.TUPLE + P.BINPERSID


def tensor(key: str, numel: int, size, stride, offset: int = 0) -> bytes:
    return (glob("torch._utils", "_rebuild_tensor_v2") + P.MARK + storage(key, numel) + val(offset)
            + val(tuple(size)) + val(tuple(stride)) + val(False) + glob("collections", "OrderedDict")
            + P.EMPTY_TUPLE + P.REDUCE + P.TUPLE + P.REDUCE)


def dict_of(*pairs: tuple[bytes, bytes]) -> bytes:
    return P.EMPTY_DICT + P.MARK + b"".join(k + v for k, v in pairs) + P.SETITEMS


def torch_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None,
              compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl, compress_type=compress)
        z.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data, compress_type=compress)
    return path


SD_KEYS = {"unet": "model.diffusion_model.input_blocks.0.0.weight", "vae": "first_stage_model.decoder.conv_in.weight",
           "text": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"}


# --- detection: shapes ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["conv_in", "to_k", "token_embedding"])
def test_one_dimensional_tensor_where_detection_reads_a_matrix(tmp_path, where):
    sd = {SD_KEYS["unet"]: torch.zeros(8, 4, 3, 3), SD_KEYS["vae"]: torch.zeros(4, 4, 3, 3),
          SD_KEYS["text"]: torch.zeros(10, 8),
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 8)}
    key = {"conv_in": SD_KEYS["unet"], "token_embedding": SD_KEYS["text"],
           "to_k": "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"}[where]
    sd[key] = torch.zeros(8)
    path = tmp_path / "flat.safetensors"
    save_file(sd, str(path))
    assert_clean_error(read_bounded(path), path, unsafe=False, match="1-D")


# --- pickles ----------------------------------------------------------------------------------
def test_self_referencing_state_dict(tmp_path):
    body = P.EMPTY_DICT + P.BINPUT + b"\x00" + val("state_dict") + P.BINGET + b"\x00" + P.SETITEM   # d["state_dict"] = d
    path = torch_zip(tmp_path / "loop.ckpt", pkl(body))
    assert_clean_error(read_bounded(path), path, unsafe=False, match="contains itself")


@pytest.mark.parametrize("target", [("pathlib", "PosixPath"), ("torch._utils", "_rebuild_tensor_v2"),
                                    ("collections", "OrderedDict"), ("lightning.Callback", "Callback")])
def test_build_on_a_class_or_function_is_refused(tmp_path, target):
    """BUILD with a slot state would setattr on the real class (str(Path(...)) breaks process-wide)."""
    state = P.NONE + P.EMPTY_DICT + val("__str__") + val(0) + P.SETITEM + P.TUPLE2
    path = torch_zip(tmp_path / "build.ckpt", pkl(dict_of((val("x"), glob(*target) + state + P.BUILD))))
    assert_clean_error(read_bounded(path), path, unsafe=True, match="sets the state of")


def test_build_on_a_tensor_cannot_grow_its_storage(tmp_path):
    """Tensor.__setstate__ would set_() an empty resizable storage to 32 GiB."""
    t = tensor("0", 0, (0,), (1,)) + P.BINPUT + b"\x05"
    state = P.MARK + P.BINGET + b"\x05" + val(0) + val((2**33,)) + val((1,)) + P.TUPLE
    path = torch_zip(tmp_path / "grow.ckpt", pkl(dict_of((val(SD_KEYS["unet"]), t + state + P.BUILD))), {"0": b""})
    assert_clean_error(read_bounded(path), path, unsafe=True, match="sets the state of a torch.Tensor")


@pytest.mark.parametrize("name", ["bytes", "bytearray"])
def test_bytes_with_an_integer_argument(tmp_path, name):
    call = glob("builtins", name) + val(2**31) + P.TUPLE1 + P.REDUCE           # a 42-byte pickle, 2 GiB
    path = torch_zip(tmp_path / "bytes.ckpt", pkl(dict_of((val("x"), call))))
    assert_clean_error(read_bounded(path), path, unsafe=True, match=f"{name}(2147483648)")


def test_plain_bytes_still_unpickle(tmp_path):
    """The control: protocol 2 pickles bytes as _codecs.encode and bytearray(bytes) - still read."""
    path = tmp_path / "b.ckpt"
    obj = {"a": b"\x00\xffab", "b": bytearray(b"xy"), "c": b""}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    assert checkpoint._read_file(path)[0] == obj


def test_deeply_nested_call_arguments_are_refused_as_unsafe(tmp_path):
    nested = P.MARK * 50_000 + P.EMPTY_LIST + P.LIST * 50_000                   # [[[...]]] 50,000 deep
    call = glob("os", "system") + nested + P.TUPLE1 + P.REDUCE
    path = torch_zip(tmp_path / "deep.ckpt", pkl(dict_of((val("x"), call))))
    message = assert_clean_error(read_bounded(path), path, unsafe=True, match="os.system(")
    assert "RecursionError" not in message


@pytest.mark.parametrize("depth,match", [(1000, "nested deeper"), (10**6, "objects")])
def test_deeply_nested_tuple_as_a_dict_key(tmp_path, depth, match):
    """Hashing a 10**6-deep tuple overflows the C stack (a segfault, not a RecursionError)."""
    key = P.EMPTY_TUPLE + P.TUPLE1 * depth
    path = torch_zip(tmp_path / "hash.ckpt", pkl(P.EMPTY_DICT + key + val(1) + P.SETITEM))
    assert_clean_error(read_bounded(path), path, unsafe=False, match=match)


def test_many_tiny_objects_are_bounded(tmp_path):
    """1 byte of pickle per empty set (216 bytes each): the object count is bounded."""
    path = torch_zip(tmp_path / "sets.ckpt", pkl(P.EMPTY_DICT + P.EMPTY_SET * 1_000_000 + P.POP * 1_000_000),
                     compress=zipfile.ZIP_DEFLATED)
    assert_clean_error(read_bounded(path), path, unsafe=False, match="objects")


# --- zip entries ------------------------------------------------------------------------------
def _patch_declared_sizes(path: Path, name: str, compressed: int, uncompressed: int) -> None:
    """Rewrite the central-directory sizes of one entry (what zipfile trusts)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")                  # the first central-directory header
    while True:
        name_len = struct.unpack("<H", data[at + 28: at + 30])[0]
        if data[at + 46: at + 46 + name_len].decode() == name:
            data[at + 20: at + 28] = struct.pack("<II", compressed, uncompressed)
            break
        extra, comment = struct.unpack("<HH", data[at + 30: at + 34])
        at += 46 + name_len + extra + comment
    path.write_bytes(bytes(data))


def test_zip_entry_with_a_huge_declared_size(tmp_path):
    path = torch_zip(tmp_path / "declared.ckpt", pkl(dict_of()))
    _patch_declared_sizes(path, "archive/data.pkl", 0x7FFF0000, 0x7FFF0000)
    assert_clean_error(read_bounded(path), path, unsafe=False, match="declares")


def test_zip_entry_that_expands_more_than_its_share(tmp_path):
    """Within the file's size budget, but 4 MB of zeros from 4 KB: more than 16x is refused."""
    body = dict_of((val(SD_KEYS["unet"]), tensor("0", 2**20, (2**20,), (1,))),
                   (val(SD_KEYS["vae"]), tensor("1", 2**18, (2**18,), (1,))))
    path = torch_zip(tmp_path / "ratio.ckpt", pkl(body), {"0": bytes(2**22)}, compress=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path, "a") as z:                # 1 MB that does not compress
        z.writestr("archive/data/1", os.urandom(2**20))
    assert_clean_error(read_bounded(path), path, unsafe=False, match="more than 16x")


def test_zip_entry_that_deflates_to_gigabytes(tmp_path):
    """A 64 MB run of zeros deflates to ~64 KB: a storage record may expand at most 16x."""
    body = dict_of((val(SD_KEYS["unet"]), tensor("0", 2**24, (2**24,), (1,))))
    path = torch_zip(tmp_path / "bomb.ckpt", pkl(body), {"0": bytes(2**26)}, compress=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2**20
    assert_clean_error(read_bounded(path), path, unsafe=False, match="declares 67108864 bytes")


# --- tensor views -----------------------------------------------------------------------------
def _views_file(tmp_path, size, stride) -> Path:
    body = dict_of((val(SD_KEYS["unet"]), tensor("0", 4, size, stride)),
                   (val(SD_KEYS["vae"]), tensor("0", 4, (4,), (1,))), (val(SD_KEYS["text"]), tensor("0", 4, (2, 2), (2, 1))))
    return torch_zip(tmp_path / "views.ckpt", pkl(body), {"0": bytes(16)})


def test_stride_zero_view_of_a_small_storage(tmp_path):
    """4 numbers viewed as (4096, 4, 512, 512): 16 GiB once read(dtype=...) casts it."""
    path = _views_file(tmp_path, (4096, 4, 512, 512), (0, 0, 0, 0))
    assert path.stat().st_size < 2048
    assert_clean_error(read_bounded(path, dtype=torch.float16), path, unsafe=False, match="more than")


def test_view_past_the_end_of_its_storage(tmp_path):
    path = _views_file(tmp_path, (8, 4, 3, 3), (36, 9, 3, 1))
    assert_clean_error(read_bounded(path), path, unsafe=False, match="reaches past its storage")


def test_cast_errors_are_wrapped(tmp_path, monkeypatch):
    """A cast that fails (here: one we make fail) is read()'s one-line error, not torch's."""
    path = ref.write_safetensors(ref.single_file(ref.compvis_stages("tiny"), extras=False), tmp_path / "m.safetensors")
    real_to = torch.Tensor.to

    def failing_to(self, *args, **kwargs):
        if args and args[0] is torch.float16:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory:\nyou tried to allocate 17179869184 bytes")
        return real_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", failing_to)
    assert_clean_error(run_bounded(lambda: checkpoint.read(path, dtype=torch.float16)), path, unsafe=False,
                       match="cannot cast")


# --- the ldm.configs metadata -----------------------------------------------------------------
@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory) -> Path:
    return weights.random_checkpoint(tmp_path_factory.mktemp("rt") / "tiny.safetensors")


def _with_configs(src: Path, dst: Path, configs) -> Path:
    meta = checkpoint.safetensors_metadata(src)
    meta[weights.CONFIG_METADATA_KEY] = configs if isinstance(configs, str) else json.dumps(configs)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def _stored_configs(path: Path) -> dict:
    return json.loads(checkpoint.safetensors_metadata(path)[weights.CONFIG_METADATA_KEY])


CONFIG_CASES = {
    "invalid-json": lambda c: "{",
    "a-list": lambda c: [],
    "unknown-stage": lambda c: {**c, "lora": {}},
    "missing-stage": lambda c: {k: v for k, v in c.items() if k != "vae"},
    "stage-not-an-object": lambda c: {**c, "unet": 3},
    "unknown-field": lambda c: {**c, "unet": {**c["unet"], "use_linear": True}},
    "string-width": lambda c: {**c, "text_encoder": {**c["text_encoder"], "hidden_size": "32"}},
    "zero-heads": lambda c: {**c, "text_encoder": {**c["text_encoder"], "num_attention_heads": 0}},
    "negative-width": lambda c: {**c, "unet": {**c["unet"], "model_channels": -32}},
    "zero-groups": lambda c: {**c, "vae": {**c["vae"], "norm_groups": 0}},
    "nan-eps": lambda c: {**c, "vae": {**c["vae"], "norm_eps": float("nan")}},
    "zero-scaling-factor": lambda c: {**c, "vae": {**c["vae"], "scaling_factor": 0}},
    "zero-sample-size": lambda c: {**c, "unet": {**c["unet"], "sample_size": 0}},
    "bool-as-int": lambda c: {**c, "unet": {**c["unet"], "num_res_blocks": True}},
    "a-million-layers": lambda c: {**c, "text_encoder": {**c["text_encoder"], "num_hidden_layers": 10**6}},
    "huge-res-blocks": lambda c: {**c, "unet": {**c["unet"], "num_res_blocks": 10**5}},
    "long-channel-mult": lambda c: {**c, "vae": {**c["vae"], "ch_mult": [1] * 10**5}},
    "wider-than-the-tensors": lambda c: {**c, "text_encoder": {**c["text_encoder"], "intermediate_size": 128}},
    "overflowing-width": lambda c: {**c, "unet": {**c["unet"], "channel_mult": [1, 2**20], "num_heads": 1}},
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_configs_metadata_is_validated_bounded_and_checked_against_the_tensors(tmp_path, random_tiny, case):
    path = _with_configs(random_tiny, tmp_path / f"{case}.safetensors", CONFIG_CASES[case](_stored_configs(random_tiny)))
    out = run_bounded(lambda: weights.build(checkpoint.read(path)))
    assert_clean_error(out, path, unsafe=False)
    assert out["seconds"] < 10, out


def test_configs_metadata_control_builds(tmp_path, random_tiny):
    """The control: the stored configs, rewritten unchanged, build; sample_size / scaling_factor kept."""
    configs = _stored_configs(random_tiny)
    configs["vae"]["scaling_factor"], configs["unet"]["sample_size"] = 0.5, 16
    path = _with_configs(random_tiny, tmp_path / "ok.safetensors", configs)
    _, unet, vae = weights.build(checkpoint.read(path))
    assert (vae.cfg.scaling_factor, unet.cfg.sample_size) == (0.5, 16)


def test_build_stage_errors_name_the_file_in_one_line(tmp_path, random_tiny):
    meta = checkpoint.safetensors_metadata(random_tiny)
    del meta[weights.CONFIG_METADATA_KEY]                     # configs from the tensors, then
    tensors = load_file(str(random_tiny))
    del tensors["cond_stage_model.transformer.text_model.final_layer_norm.weight"]  # one tensor short
    path = tmp_path / "no-configs.safetensors"
    save_file(tensors, str(path), metadata=meta)
    message = assert_clean_error(run_bounded(lambda: weights.build(checkpoint.read(path))), path, unsafe=False)
    assert "text_encoder of a sd1 checkpoint does not fit CLIPTextModel" in message


def test_load_stage_size_mismatch_is_one_line():
    module = torch.nn.Linear(2, 3)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_stage(module, {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, "vae", path="m.ckpt")
    assert "\n" not in str(err.value) and str(err.value).startswith("m.ckpt: vae of a sd1 checkpoint")
    assert "weight: (3, 3) in the file, (3, 2) in the model" in str(err.value)


# --- diffusers folders ------------------------------------------------------------------------
def _edit_json(path: Path, edit) -> None:
    text = path.read_text()
    out = edit(json.loads(text))
    path.write_text(out if isinstance(out, str) else json.dumps(out))


DIFFUSERS_CASES = {
    "config-brace": ("unet/config.json", lambda c: "{"),
    "index-a-list": ("model_index.json", lambda c: []),
    "config-a-list": ("vae/config.json", lambda c: [1, 2]),
    "not-utf8": ("unet/config.json", lambda c: "\udcff"),
    "many-block-types": ("unet/config.json", lambda c: {**c, "down_block_types": ["DownBlock2D"] * 10**5,
                                                        "up_block_types": ["UpBlock2D"] * 10**5}),
    "huge-layers-per-block": ("unet/config.json", lambda c: {**c, "layers_per_block": 10**9}),
    "string-layers": ("vae/config.json", lambda c: {**c, "layers_per_block": "2"}),
    "block-types-not-strings": ("unet/config.json", lambda c: {**c, "down_block_types": [1, 2, 3]}),
    "more-levels-than-weights": ("vae/config.json", lambda c: {**c, "block_out_channels": [8, 16, 16, 16]}),
}


@pytest.mark.parametrize("case", DIFFUSERS_CASES)
def test_diffusers_folder_json_is_validated(tmp_path, case):
    folder = ref.write_diffusers_folder(tmp_path / "sd")
    name, edit = DIFFUSERS_CASES[case]
    if case == "not-utf8":
        (folder / name).write_bytes(b"\xff\xfe{")
    else:
        _edit_json(folder / name, edit)
    out = read_bounded(folder)
    assert_clean_error(out, folder, unsafe=False)
    assert out["seconds"] < 10, out


# --- the weights/ folder ----------------------------------------------------------------------
@pytest.mark.parametrize("head", [b"\x10\x00", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\"", b"\xff" * 8 + b"{"])
def test_truncated_safetensors_in_weights_folder(tmp_path, random_tiny, head, monkeypatch):
    monkeypatch.delenv("LDM_CHECKPOINT", raising=False)
    folder = tmp_path / "weights"
    folder.mkdir()
    path = folder / "cut.safetensors"
    path.write_bytes(head)
    out = run_bounded(lambda: (weights.is_random(path), weights.find_checkpoint(folder, real_only=True)))
    assert out["error"] is None, out
    assert out["value"] == repr((False, path))
    assert_clean_error(run_bounded(lambda: checkpoint.safetensors_metadata(path)), path, unsafe=False)


def test_write_single_file_metadata(tmp_path):
    te, unet, vae, configs = weights.random_models("tiny")
    path = weights.write_single_file(tmp_path / "m.safetensors", te, unet, vae, configs=configs,
                                     metadata={"ldm.train.steps": "1000", "note": "shapes"})
    meta = checkpoint.safetensors_metadata(path)
    assert meta["ldm.train.steps"] == "1000" and meta["note"] == "shapes" and weights.CONFIG_METADATA_KEY in meta
    for bad, match in [({"ldm.configs": "{}"}, "written by ldm itself"), ({"steps": 3}, "dict of str to str")]:
        with pytest.raises(ValueError, match=match):
            weights.write_single_file(tmp_path / "n.safetensors", te, unet, vae, metadata=bad)
    with pytest.raises(ValueError, match="needs a .safetensors path"):
        weights.write_single_file(tmp_path / "n.ckpt", te, unet, vae, metadata={"a": "b"})


def test_a_file_name_with_newlines_and_escapes_stays_one_printable_line(tmp_path):
    """A path is text the user did not write (a download, an archive): its control characters are
    shown as escapes, so the error stays one line and cannot drive the terminal."""
    path = tmp_path / "evil\n\x1b[2Jname.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read(path)
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message
    assert "evil\\n\\x1b[2Jname.safetensors" in message
