"""The persistent compilation cache: a second process compiles nothing that the first one did."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import script_json, tiny_hf_model

from jaxspec import compile_cache

SCRIPT = r"""
import json, sys
import jax
events = {}
jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(
    name, events.get(name, 0) + 1))
import jaxspec
model = jaxspec.load_model(sys.argv[1])
tokens = []
for mode in ("dynamic", "static"):
    dec = jaxspec.SpeculativeDecoder(model, "ngram", num_speculative_tokens=2, mode=mode)
    tokens.append(dec.generate([[5, 6, 7, 5, 6]], max_new_tokens=6, temperature=0.7).tokens)
print(json.dumps({"hits": events.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": events.get("/jax/compilation_cache/cache_misses", 0),
                  "tokens": tokens, "dir": jax.config.jax_compilation_cache_dir,
                  "max_size": jax.config.jax_compilation_cache_max_size}))
"""


def test_second_process_compiles_nothing(tmp_path):
    model_dir = tiny_hf_model("llama", tmp_path)
    cache = str(tmp_path / "cache")
    first, second = (script_json(SCRIPT, model_dir, cache=cache) for _ in range(2))
    assert first["dir"] == second["dir"] == os.path.join(cache, "xla")
    assert first["misses"] > 0 and first["hits"] == 0, first
    assert second["misses"] == 0 and second["hits"] >= first["misses"], second
    assert second["tokens"] == first["tokens"]
    assert first["max_size"] == compile_cache.MAX_BYTES  # bounded (least recently used go)


def test_entries_written_while_unbounded_do_not_stop_later_writes(tmp_path):
    """JAX's LRU eviction reads an access-time file per entry: an entry without one (written
    by an unbounded cache) made every later write fail, so nothing new was ever cached."""
    model_dir = tiny_hf_model("llama", tmp_path)
    cache = tmp_path / "cache"
    os.makedirs(cache / "xla")
    (cache / "xla" / f"jit_old-0123{compile_cache.ENTRY}").write_bytes(b"an old entry")
    first, second = (script_json(SCRIPT, model_dir, cache=str(cache)) for _ in range(2))
    assert first["misses"] > 0
    assert second["misses"] == 0 and second["hits"] >= first["misses"], second
    stamp = (cache / "xla" / f"jit_old-0123{compile_cache.ACCESS_TIME}").read_bytes()
    assert int.from_bytes(stamp, "little") == os.stat(
        cache / "xla" / f"jit_old-0123{compile_cache.ENTRY}").st_mtime_ns


def test_opt_out_and_a_users_own_cache_directory_are_respected(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "0")
    assert compile_cache.enable() is None
    code = ("import jax; jax.config.update('jax_compilation_cache_dir', sys.argv[1]); "
            "from jaxspec import compile_cache; print(compile_cache.enable(), "
            "jax.config.jax_compilation_cache_max_size)")
    env = {**os.environ, compile_cache.ENV: "1", "JAXSPEC_CACHE": str(tmp_path / "js")}
    done = subprocess.run([sys.executable, "-c", "import sys; " + code, str(tmp_path / "mine")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"{tmp_path / 'mine'} -1"  # JAX's defaults kept
