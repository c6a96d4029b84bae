"""Hostile LoRA files and --lora specs: each must end in ldm's own one-line error (LoRAError; the
reader's own class for a folder given as an embedding or checkpoint file) naming the file or
argument, within seconds and bounded memory, with no weight of the model changed.

The files are a few tensors shaped for the tiny model, built here with safetensors or torch.save.
Reads that could hang or raise a raw exception run in a forked child (tests/bounded.py).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from bounded import assert_one_line_error, run_bounded
from ldm import checkpoint, lora, prompt, weights

ERRORS = ("LoRAError",)
TO_K = "input_blocks.1.1.transformer_blocks.0.attn1.to_k"  # a Linear (32, 32) of the tiny UNet


@pytest.fixture(scope="module")
def models():
    te, unet, _, _ = weights.random_models("tiny")
    return te, unet


def kohya_key(unet, name: str = TO_K) -> str:
    """The kohya spelling (lora_unet_ + diffusers name with underscores) of one of our UNet modules."""
    alias = next(a for a, n in lora.module_table("unet", unet).items() if n == name and a.startswith("down_"))
    return "lora_unet_" + alias.replace(".", "_")


def kohya_file(path, unet, down, up, alpha=None, name: str = TO_K):
    key = kohya_key(unet, name)
    sd = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    if alpha is not None:
        sd[f"{key}.alpha"] = alpha
    save_file(sd, str(path))
    return path


def peft_file(path, metadata: str | None, names=("a.to_q",)):
    """A peft file with rank-2 layers for `names` (no model needed to read it) and raw metadata text."""
    sd = {}
    for name in names:
        sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = torch.ones(2, 8), torch.ones(8, 2)
    save_file(sd, str(path), metadata=None if metadata is None else {"lora_adapter_metadata": metadata})
    return path


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m._forward_hooks for m in model.modules()), "a forward hook was left behind"


# --- 1. alpha_pattern: a file's regex is never run -----------------------------------------------
@pytest.mark.parametrize("pattern,match", [
    ({"(a+)+b": 4}, "'(a+)+b'"),                       # catastrophic backtracking against 'aaa...a'
    ({"(": 4}, "'('"),                                   # not even a regex
    ({"a" * 1000: 4}, "characters"),                     # a key longer than any module name
    ({f"m{i}": 4 for i in range(5000)}, "keys"),         # more keys than any model has modules
])
def test_alpha_pattern_is_not_run_as_a_regex(tmp_path, pattern, match):
    meta = json.dumps({"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": pattern})
    path = peft_file(tmp_path / "pattern.safetensors", meta, names=("a" * 40,))
    out = run_bounded(lambda: lora.read(path), deadline_s=10)
    assert_one_line_error(out, ERRORS, str(path), match=match, max_len=400)
    assert "alpha_pattern" in out["message"]


def test_alpha_pattern_keys_match_module_name_suffixes(tmp_path):
    """peft's rule, literally: a key matches a module whose dotted name is the key or ends in '.' + key;
    the first key that matches wins."""
    meta = json.dumps({"unet.r": 2, "unet.lora_alpha": 2,
                       "unet.alpha_pattern": {"attn1.to_q": 8, "to_q": 4, "b.attn2.to_q": 6}})
    names = ("b.attn1.to_q", "b.attn2.to_q", "b.xto_q", "to_q")
    lo = lora.read(peft_file(tmp_path / "p.safetensors", meta, names=names))
    assert {n: l.alpha for n, l in lo.layers["unet"].items()} == {
        "b.attn1.to_q": 8, "b.attn2.to_q": 4, "b.xto_q": 2, "to_q": 4}


# --- 2. malformed peft metadata --------------------------------------------------------------------
@pytest.mark.parametrize("raw,match", [
    ("[]", "a JSON array"), ("null", "a JSON null"), ('"unet"', "a JSON string"),
    ('{"unet.lora_alpha": 1' + "0" * 400 + "}", "finite number"),       # an int that float() overflows
    ('{"unet.lora_alpha": 1' + "0" * 5000 + "}", "lora_adapter_metadata"),  # past Python's int-string limit
    ('{"unet.lora_alpha": 1e400}', "finite number"),                     # json reads it as inf
    ('{"unet.lora_alpha": 2, "unet.alpha_pattern": [1, 2]}', "alpha_pattern"),
    ('{"unet.lora_alpha": 2, "unet.alpha_pattern": {"a": 1' + "0" * 400 + "}}", "finite number"),
    ("[" * 100_000 + "]" * 100_000, "lora_adapter_metadata"),          # json.loads: RecursionError
])
def test_malformed_peft_metadata(tmp_path, raw, match):
    path = peft_file(tmp_path / "meta.safetensors", raw)
    out = run_bounded(lambda: lora.read(path), deadline_s=10)
    assert_one_line_error(out, ERRORS, str(path), match=match, max_len=400)


# --- 3. a folder given as a file -----------------------------------------------------------------
@pytest.mark.parametrize("reader,errors", [(lora.read, ("LoRAError",)),
                                           (prompt.read_embedding, ("EmbeddingError",)),
                                           (checkpoint._read_file, ("CheckpointError",))])
def test_a_folder_given_as_a_file(tmp_path, reader, errors):
    folder = tmp_path / "style.safetensors"
    folder.mkdir()
    out = run_bounded(lambda: reader(folder), deadline_s=10)
    assert_one_line_error(out, errors, str(folder), match="a directory", max_len=300)


def test_a_folder_is_still_a_diffusers_folder_for_checkpoint_read(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="without model_index.json"):
        checkpoint.read(tmp_path)


# --- 4. odd tensors and keys that raised raw exceptions ----------------------------------------------
def _int_keys(path, unet):
    torch.save({1: torch.ones(2, 32), 2: torch.ones(32, 2)}, path)


def _rank_0(path, unet):
    kohya_file(path, unet, torch.zeros(0, 32), torch.zeros(32, 0))


def _alpha_empty(path, unet):
    kohya_file(path, unet, torch.ones(2, 32), torch.ones(32, 2), alpha=torch.zeros(0))


def _alpha_two(path, unet):
    kohya_file(path, unet, torch.ones(2, 32), torch.ones(32, 2), alpha=torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("write,match", [(_int_keys, "not strings"), (_rank_0, "rank 0"),
                                         (_alpha_empty, "alpha"), (_alpha_two, "alpha")])
def test_odd_tensors_and_keys(tmp_path, models, write, match):
    te, unet = models
    path = tmp_path / ("odd.pt" if write is _int_keys else "odd.safetensors")
    write(path, unet)
    before = state(unet)
    out = run_bounded(lambda: lora.apply({"text_encoder": te, "unet": unet}, [(path, 1.0)]), deadline_s=10)
    message = assert_one_line_error(out, ERRORS, str(path), match=match, max_len=300)
    if write in (_alpha_empty, _alpha_two):
        assert "attn1_to_k" in message, message  # names the layer
    assert_unchanged(unet, before)


def test_fp8_lora_is_read_as_float32(tmp_path, models):
    """Real LoRAs ship in float8_e4m3fn; torch cannot check those for NaN, so they are upcast (exactly)."""
    te, unet = models
    g = torch.Generator().manual_seed(0)
    down, up = (torch.randn(2, 32, generator=g) * 0.1).to(torch.float8_e4m3fn), \
        (torch.randn(32, 2, generator=g) * 0.1).to(torch.float8_e4m3fn)
    fp8 = kohya_file(tmp_path / "fp8.safetensors", unet, down, up, alpha=torch.tensor(1.0))
    f32 = kohya_file(tmp_path / "f32.safetensors", unet, down.float(), up.float(), alpha=torch.tensor(1.0))
    results = []
    for path in (fp8, f32):
        with lora.apply({"text_encoder": te, "unet": unet}, [(path, 1.0)]):
            results.append(unet.get_submodule(TO_K).weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


# --- 5. numbers that overflow the merge: refused up front, naming the file, the layer and the weight --
@pytest.mark.parametrize("case,merge", [(c, m) for c in ("values", "alpha", "weight", "int weight", "fp16")
                                        for m in (True, False)])
def test_overflowing_lora_is_refused_before_any_weight_changes(tmp_path, models, case, merge):
    te, unet = models
    small = (torch.ones(2, 32) * 0.01, torch.ones(32, 2) * 0.01)
    down, up, alpha, weight = *small, torch.tensor(1.0), 1.0
    if case == "values":
        down, up = torch.full((2, 32), 1e30), torch.full((32, 2), 1e30)
    elif case == "alpha":
        down, up, alpha = torch.full((2, 32), 2.0), torch.full((32, 2), 2.0), torch.tensor(3e38)  # 1.5e38 * 8
    elif case == "weight":
        weight = 1e308                                   # --lora x:1e308
    elif case == "int weight":
        weight = 10**400                                 # float() overflows
    elif case == "fp16":
        down, up = torch.full((2, 32), 1e3), torch.full((32, 2), 1e3)  # 2e6: finite in float32, not in float16
        unet = weights.random_models("tiny")[1].half()
    path = kohya_file(tmp_path / f"big-{case}.safetensors", unet, down, up, alpha)
    before = state(unet)
    out = run_bounded(lambda: lora.apply({"text_encoder": te, "unet": unet}, [(path, weight)], merge=merge), deadline_s=10)
    message = assert_one_line_error(out, ERRORS, str(path), max_len=300)
    if case == "int weight":
        assert "not a finite number" in message, message
    else:
        assert TO_K in message and "weight" in message and "checkpoint" not in message, message
    with pytest.raises(lora.LoRAError):
        lora.apply({"text_encoder": te, "unet": unet}, [(path, weight)], merge=merge)  # in this process: nothing merged, no hook left
    assert_unchanged(unet, before)


def test_a_good_lora_next_to_an_overflowing_one_is_not_merged(tmp_path, models):
    te, unet = models
    good = kohya_file(tmp_path / "good.safetensors", unet, torch.ones(2, 32), torch.ones(32, 2),
                      name="input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    bad = kohya_file(tmp_path / "bad.safetensors", unet, torch.full((2, 32), 1e30), torch.full((32, 2), 1e30))
    before = state(unet)
    with pytest.raises(lora.LoRAError, match="bad.safetensors"):
        lora.apply({"text_encoder": te, "unet": unet}, [(good, 1.0), (bad, 1.0)])
    assert_unchanged(unet, before)


# --- 6. file-provided names in messages: quoted, cut, a few listed -------------------------------------
HOSTILE = "\x1b[2J\x1b[31mpwned\n"  # clear the screen, red text, a newline


def _name(i: int, size: int = 2**20) -> str:
    return f"{HOSTILE}{i}" + "x" * size


@pytest.mark.parametrize("case", ["kohya unknown", "dotted unknown", "missing up", "unmatched", "not tensors"])
def test_file_provided_names_are_quoted_and_cut(tmp_path, models, case):
    """Five 1 MB names with terminal escapes and a newline: the message quotes a few, cut short."""
    te, unet = models
    if case == "kohya unknown":
        sd = {f"lora_unet_{_name(i)}.hada_w1": torch.ones(2, 32) for i in range(5)}
    elif case == "dotted unknown":
        sd = {f"unet.{_name(i)}.weird": torch.ones(2, 32) for i in range(5)}
    elif case == "missing up":
        sd = {f"lora_unet_{HOSTILE}.lora_down.weight": torch.ones(2, 32)}
    elif case == "unmatched":
        sd = {f"lora_unet_{_name(i)}.lora_{d}.weight": torch.ones(2, 32) if d == "down" else torch.ones(32, 2)
              for i in range(5) for d in ("down", "up")}
    if case == "not tensors":  # the restricted reader takes a pickle of a few MB: 64 KB names
        path = tmp_path / "names.pt"
        torch.save({_name(i, 2**16): "text" for i in range(5)}, path)
    else:
        path = tmp_path / "names.safetensors"
        save_file(sd, str(path))
    out = run_bounded(lambda: lora.apply({"text_encoder": te, "unet": unet}, [(path, 1.0)]), deadline_s=20)
    message = assert_one_line_error(out, ERRORS, str(path), max_len=600)
    assert "\\x1b" in message, message  # the name is there, escaped by repr


# --- 7. --lora PATH[:WEIGHT] ------------------------------------------------------------------------
def test_parse_spec_takes_an_existing_path_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my:style.safetensors").write_bytes(b"x")
    assert lora.parse_spec("my:style.safetensors") == ("my:style.safetensors", 1.0)
    assert lora.parse_spec("my:style.safetensors:0.5") == ("my:style.safetensors", 0.5)


@pytest.mark.parametrize("text,match", [("a.safetensors:" + "9" * 400, "not a finite number"),
                                        ("a.safetensors:" + "x" * 400, "not a number"),
                                        ("a\x1b[2J.safetensors:x", "not a number")])
def test_parse_spec_weight_errors_are_short(text, match):
    with pytest.raises(lora.LoRAError, match=match) as e:
        lora.parse_spec(text)
    message = str(e.value)
    assert len(message) < 300 and "\n" not in message and "\x1b" not in message, message


def test_a_finite_but_huge_lora_is_named_when_the_generation_overflows(tmp_path):
    """alpha 3e38 on tiny matrices merges to finite to_v weights of about 3e34, so only the generation
    overflows; the error then names the LoRA first, not the checkpoint's weights."""
    import ldm
    from ldm.pipeline import NonFiniteError

    pipe = ldm.load(weights.random_checkpoint(tmp_path / "m.safetensors"), device="cpu")
    r = 4
    path = kohya_file(tmp_path / "huge.safetensors", pipe.unet, torch.full((r, 32), 1e-2), torch.full((32, r), 1e-2),
                      alpha=torch.tensor(3e38), name=TO_K.replace("to_k", "to_v"))
    pipe.load_lora(path)
    with pytest.raises(NonFiniteError, match=r"the LoRAs loaded \('huge'\) may push the weights out of range"):
        pipe.generate("a dog", steps=2, height=64, width=64, progress=False)
