"""Tensor and data parallelism on 8 CPU devices (a subprocess with
--xla_force_host_platform_device_count=8, compiled without LLVM's optimizations): every mesh
gives the unsharded output, greedy and sampled, plain and with model and n-gram drafts; params
and caches carry the intended splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, UNOPTIMIZED_XLA, tiny_model

from jaxspec.errors import UserError
from jaxspec.models import sharding


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "tests"),  # mesh logic, not codegen:
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {UNOPTIMIZED_XLA}"}
    worker = os.path.join(REPO, "tests", "models", "sharding_worker.py")
    done = subprocess.run([sys.executable, worker, str(tmp_path_factory.mktemp("sharding"))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("mesh", ["tp2", "tp4", "dp2_tp2"])
@pytest.mark.parametrize("kind", ["none", "model", "ngram"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_every_mesh_gives_the_unsharded_tokens(results, mesh, kind, temperature):
    single, _ = results[f"single/{kind}/{temperature}"]
    sharded, _ = results[f"{mesh}/{kind}/{temperature}"]
    assert sharded == single
    assert all(len(row) == 16 for row in single)


def test_arrays_carry_the_intended_shardings(results):
    _, found = results["dp2_tp2/model/0.8"]
    assert found["cache"] == found["values"] == [None, "data", "model"]  # [L, B, K, ., .]
    assert found["tokens"] == ["data"]  # [B, S]
    assert found["wqkv"] == [None, "model"]  # [D, K, G + 2, Dh]
    assert found["embed"] == ["model"]  # [V, D]
    assert found["norm"] == []  # replicated


def test_memory_plan_counts_one_devices_part(results):
    """tp=2 × dp=2, 2 prompts, γ = 2, sampled: params and cache as their shards, the
    token buffer over rows, the logits, q and p over rows and vocabulary; on CPU the four
    devices share the host's memory."""
    plan = results["api"]["plan"]
    planned, shard, whole = plan["target_params"]
    assert planned == shard < whole
    assert plan["target_cache"][0] == plan["target_cache"][1]
    assert plan["token_buffer"][0] == plan["token_buffer"][1]
    assert plan["activations"][0] == plan["activations"][1]
    assert plan["capacity_shared_by"] == 4


def test_api_restores_shards_and_decodes_alike(results):
    api = results["api"]
    assert api["restored"] == {"embed": ["model"], "wqkv": [None, "model"], "w_down": ["model"]}
    assert api["loaded_tp2"] == api["single"] and api["decoder_tp2_dp2"] == api["single"]
    assert "must be a token id" in api.get("bad_token_error", "")


@pytest.mark.parametrize("tp,dp,message", [
    (3, 1, "does not divide the model's key/value heads (2)"),
    (2, 4, "needs 8 devices; 4 available"),
    (0, 1, "must be >= 1"),
])
def test_bad_meshes_are_refused_in_one_line(tp, dp, message):
    config = tiny_model(kv_heads=2).config
    with pytest.raises(UserError) as info:
        sharding.check(config, tp=tp, dp=dp, devices=4)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("flags,message", [
    (["--tp", "2"], "tp × dp = 2 needs 2 devices; 1 available"),
    (["--dp", "2"], "--dp must be 1 for the CLI's single prompt"),
])
def test_cli_refuses_meshes_it_cannot_build(tmp_path, capsys, flags, message):
    from helpers import tiny_hf_model

    from jaxspec.generate import main

    model = tiny_hf_model("llama", tmp_path)
    capsys.readouterr()  # transformers' own progress output while saving
    assert main(["hi", "--model", model, "--max-new-tokens", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
