"""Orbax round trip, atomic conversion, bf16, and bad-input errors of jaxspec.checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import (REPO, plain_params, read_json, tiny_config, tiny_hf_model, tiny_params,
                     tiny_torch_model, write_tiny_gguf)
from safetensors.numpy import load_file, save_file

from jaxspec.checkpoint import conversion, convert, load_model, store
from jaxspec.errors import UserError



def leaves_equal(a, b) -> bool:
    same_tree = jax.tree.structure(a) == jax.tree.structure(b)
    return same_tree and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_orbax_round_trip_is_exact(tmp_path):
    src = tiny_hf_model("qwen2", tmp_path)
    dst = convert(src, str(tmp_path / "ckpt"))
    direct, restored = load_model(src), load_model(dst)
    assert restored.config == direct.config
    assert leaves_equal(direct.params, restored.params)
    assert isinstance(restored.params["layers"], list)
    for m in (direct, restored):  # device arrays: a generate call must not copy the weights
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(m.params))
    assert restored.path == dst and direct.path == src
    text = "Hi there<|im_end|> 42"
    assert restored.tokenizer.encode(text) == direct.tokenizer.encode(text)
    assert restored.tokenizer.eos_token == "<|im_end|>"
    assert restored.tokenizer.chat_template == direct.tokenizer.chat_template is not None
    assert read_json(os.path.join(dst, "config.json"))[store.MARKER] == store.FORMAT_VERSION


def test_converted_params_are_stored_uncompressed(tmp_path):
    """store.write keeps the params as they are (a restore reads, not decompresses): a
    checkpoint of zeros takes at least their bytes, where Orbax's default compresses them to
    almost nothing; both restore exactly."""
    from jaxspec.checkpoint import orbax_io

    config = tiny_config(vocab=4096, hidden=64, layers=2)
    params = jax.tree.map(np.zeros_like, tiny_params(config, 0))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))

    def size(folder):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder)
                   for f in fs)

    os.makedirs(tmp_path / "model")
    store.write(str(tmp_path / "model"), config, params, "float32", {})
    orbax_io.save(str(tmp_path / "compressed"), params)
    assert size(tmp_path / "model" / "params") >= nbytes > 20 * size(tmp_path / "compressed")
    for folder in (tmp_path / "model" / "params", tmp_path / "compressed"):
        restored = orbax_io.restore(str(folder), store.abstract_params(config, "float32"))
        assert leaves_equal(restored, params)


def _as_format_1(config, params):
    """params in format 1's layout: all query heads, then keys, then values; gate then up."""
    G, D = config.num_groups, config.hidden_size

    def flat(layer):
        layer = dict(layer)
        for name in ("wqkv", "bqkv"):
            if name in layer:
                w = np.asarray(layer[name])  # [..., K, G + 2, Dh]
                lead = w.shape[:-3]
                q, k, v = w[..., :G, :], w[..., G, :], w[..., G + 1, :]
                layer[name] = np.concatenate([x.reshape(lead + (-1,)) for x in (q, k, v)], -1)
        layer["w_gate_up"] = np.asarray(layer["w_gate_up"]).reshape(D, -1)
        return layer

    return {**params, "layers": [flat(layer) for layer in params["layers"]]}


def test_format_1_checkpoint_is_upgraded_on_load(tmp_path, monkeypatch):
    src = tiny_hf_model("qwen2", tmp_path)  # qkv bias too
    direct = load_model(src)
    old = _as_format_1(direct.config, jax.tree.map(np.asarray, plain_params(direct)))
    dst = str(tmp_path / "v1")
    os.mkdir(dst)
    monkeypatch.setattr(store, "FORMAT_VERSION", 1)
    store.write(dst, direct.config, old, "float32", {})
    assert read_json(os.path.join(dst, "config.json"))[store.MARKER] == 1
    assert leaves_equal(direct.params, load_model(dst).params)


def test_bfloat16_load_and_convert(tmp_path):
    src = tiny_hf_model("llama", tmp_path)
    f32 = load_model(src)
    bf16 = load_model(src, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.params))
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), plain_params(f32))
    assert leaves_equal(rounded, plain_params(bf16))  # bf16 is packed for the CPU kernel too
    dst = convert(src, str(tmp_path / "bf16"), dtype="bfloat16")
    assert read_json(os.path.join(dst, "config.json"))["dtype"] == "bfloat16"
    assert leaves_equal(load_model(dst, dtype="bfloat16").params, bf16.params)
    widened = load_model(dst)  # stored bf16, restored as float32
    assert leaves_equal(jax.tree.map(lambda x: x.astype(jnp.float32), plain_params(bf16)),
                        plain_params(widened))


def test_bf16_safetensors_are_read_without_torch(tmp_path):
    src = tiny_hf_model("llama", tmp_path)
    weights = os.path.join(src, "model.safetensors")
    tensors = load_file(weights)
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, weights)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jaxspec.checkpoint import load_model\n"
            f"m = load_model({src!r}); print(m.params['embed'].dtype)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "float32"


def test_generation_config_eos_ids_are_merged(tmp_path):
    src = tiny_hf_model("llama", tmp_path)
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 0]}, f)
    assert load_model(src).config.eos_token_ids == (2, 0)


def test_sharded_safetensors_with_index(tmp_path):
    src = tiny_hf_model("mistral", tmp_path)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    os.remove(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(src, shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    model = load_model(src)
    np.testing.assert_array_equal(np.asarray(model.params["embed"]),
                                  tensors["model.embed_tokens.weight"])


def _leftovers(parent, name):
    return [n for n in os.listdir(parent) if n.startswith(f".{name}.tmp")]


def test_failure_mid_conversion_leaves_nothing(tmp_path, monkeypatch):
    src = tiny_hf_model("llama", tmp_path)

    def failing_progress(items, total):
        for i, item in enumerate(items):
            if i == total // 2:
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C
            yield item

    monkeypatch.setattr(conversion, "_progress", failing_progress)
    with pytest.raises(KeyboardInterrupt):
        convert(src, str(tmp_path / "dst"))
    assert not os.path.exists(tmp_path / "dst") and not _leftovers(tmp_path, "dst")


def test_failure_after_writing_everything_leaves_nothing(tmp_path, monkeypatch):
    src = tiny_hf_model("llama", tmp_path)
    real_rename = os.rename

    def failing_rename(a, b):
        if os.path.basename(str(a)).startswith(".dst.tmp"):
            assert os.path.isdir(os.path.join(a, "params"))  # fully written, just not renamed
            raise OSError("disk full")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk full"):
        convert(src, str(tmp_path / "dst"))
    assert not os.path.exists(tmp_path / "dst") and not _leftovers(tmp_path, "dst")


def test_existing_destination_is_refused(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    (tmp_path / "dst").mkdir()
    with pytest.raises(UserError, match="already exists"):
        convert(src, str(tmp_path / "dst"))


def test_checkpoint_without_tokenizer_loads_with_none(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    assert load_model(src).tokenizer is None
    assert load_model(convert(src, str(tmp_path / "dst"))).tokenizer is None


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope")
    assert missing in _one_line_error(load_model, missing)
    assert missing in _one_line_error(convert, missing, str(tmp_path / "dst"))


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    message = _one_line_error(load_model, str(tmp_path))
    assert "not a checkpoint directory" in message and "safetensors" in message


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file")
    assert "not a GGUF file" in _one_line_error(load_model, str(tmp_path / "x.gguf"))


def test_pickled_weights_are_refused(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    os.replace(os.path.join(src, "model.safetensors"), os.path.join(src, "pytorch_model.bin"))
    message = _one_line_error(load_model, src)
    assert "safetensors" in message and ".bin" in message


def test_unsupported_model_type(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    config = read_json(os.path.join(src, "config.json"))
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({**config, "model_type": "gpt2"}, f)
    message = _one_line_error(load_model, src)
    assert "gpt2" in message and all(k in message for k in ("llama", "mistral", "qwen2", "qwen3"))


def test_truncated_safetensors(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    weights = os.path.join(src, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    assert weights in _one_line_error(load_model, src)


def test_missing_tensor_is_named(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    weights = os.path.join(src, "model.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    assert "model.layers.1.mlp.up_proj.weight" in _one_line_error(load_model, src)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    config = read_json(os.path.join(src, "config.json"))
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({**config, "intermediate_size": 96}, f)
    message = _one_line_error(convert, src, str(tmp_path / "dst"))
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "(96, 64)" in message and "(128, 64)" in message
    assert not os.path.exists(tmp_path / "dst") and not _leftovers(tmp_path, "dst")


def test_truncated_gguf(tmp_path):
    path = write_tiny_gguf(tiny_torch_model("llama"), str(tmp_path / "m.gguf"))
    os.truncate(path, os.path.getsize(path) - 100)
    assert path in _one_line_error(load_model, path)
    os.truncate(path, 64)  # inside the metadata
    assert path in _one_line_error(load_model, path)


def test_bad_dtype(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    assert "float16" in _one_line_error(load_model, src, dtype="float16")
    assert "float16" in _one_line_error(convert, src, str(tmp_path / "d"), dtype="float16")


def test_converting_a_jaxspec_checkpoint_is_refused(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    dst = convert(src, str(tmp_path / "dst"))
    assert "already a jaxspec checkpoint" in _one_line_error(convert, dst, str(tmp_path / "x"))


def _run_script(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "convert_hf.py"), *args],
                          capture_output=True, text=True)


def test_convert_script(tmp_path):
    src = tiny_hf_model("qwen3", tmp_path)
    done = _run_script(src, str(tmp_path / "out"), "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "out")
    assert load_model(str(tmp_path / "out")).params["embed"].dtype == jnp.float32
    failed = _run_script(str(tmp_path / "missing"), str(tmp_path / "out2"))
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1
    assert "Traceback" not in failed.stderr


def test_damaged_checkpoint_params(tmp_path):
    src = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    dst = convert(src, str(tmp_path / "dst"))
    shutil.rmtree(os.path.join(dst, "params"))
    assert "cannot restore params" in _one_line_error(load_model, dst)
