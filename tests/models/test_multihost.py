"""scripts/multihost.py: two processes on this machine (one CPU device each) joined by
`jax.distributed.initialize` decode as one process does, with tp = 2 and with dp = 2, from a
converted checkpoint (Orbax restores each process's shards) and from a Hugging Face directory
(loaded in memory, then each process places its own devices' parts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import REPO, tiny_hf_model

import jaxspec
from jaxspec import bench
from jaxspec.checkpoint import convert

SCRIPT = os.path.join(REPO, "scripts", "multihost.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    hf = tiny_hf_model("llama", tmp)
    return {"converted": convert(hf, str(tmp / "converted")), "hf": hf}


@pytest.mark.parametrize("source,tp,dp", [("converted", 2, 1), ("converted", 1, 2),
                                          ("hf", 2, 1)])
def test_two_processes_decode_as_one(models, source, tp, dp):
    model = models[source]
    port = _free_port()
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags)}  # one CPU device each
    common = ["hello there", "--coordinator", f"localhost:{port}", "--num-processes", "2",
              "--model", model, "--draft", "ngram", "--tp", str(tp), "--dp", str(dp),
              "--max-new-tokens", "12", "--temperature", "0.7", "--seed", "3", "--json"]
    procs = [subprocess.Popen([sys.executable, SCRIPT, *common, "--process-id", str(i)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    printed = [[line for line in out.splitlines() if line.startswith("{")] for out, _ in outs]
    assert len(printed[0]) == 1 and printed[1] == []  # only process 0 prints (gloo logs aside)
    got = json.loads(printed[0][0])
    target = jaxspec.load_model(model)
    ids = bench.prompt_ids(target, "hello there")
    single = jaxspec.SpeculativeDecoder(target, "ngram", num_speculative_tokens=3).generate(
        [ids] * dp, max_new_tokens=12, temperature=0.7, seed=3)
    assert got["tokens"] == single.tokens
