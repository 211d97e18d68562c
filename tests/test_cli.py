"""`python -m jaxspec.generate`: streaming, --json, drafts, bad input, no torch.

Generation runs in subprocesses against one tiny random Hugging Face llama (conftest's byte-level
BPE tokenizer with a chat template), built once per session. Each generating subprocess costs a
JAX import and a compile (a few seconds on 2 cores), so the checks share runs where they can.
Bad inputs are checked in-process through `main` (all of them, cheap) and, for a representative
set, through real subprocesses run two at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import REPO, tiny_hf_model

from jaxspec import generate as cli_module
from jaxspec.checkpoint.tokenizer import encode_prompt
from jaxspec.errors import UserError

PROMPT = "Say hello to the cat."
MAX_NEW = 8
STATS_KEYS = {"new_tokens", "prompt_tokens", "tokens_per_second", "compile_seconds"}
DRAFT_STATS_KEYS = {"acceptance_rate", "mean_accepted_length", "accepted_per_position",
                    "target_forward_calls", "draft_forward_calls"}


def cli(*args: str, env: dict | None = None, timeout: float = 600,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxspec.generate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, input=stdin)


def assert_user_error(returncode: int, out: str, err: str) -> None:
    assert returncode == 2, (returncode, out, err)
    assert "Traceback" not in err, err
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return tiny_hf_model("llama", tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="session")
def loaded(model_dir):
    from jaxspec.checkpoint import load_model

    return load_model(model_dir)


@pytest.fixture(scope="session")
def greedy_json(model_dir) -> dict:
    """One greedy --json run, shared by several tests."""
    done = cli(PROMPT, "--model", model_dir, "--max-new-tokens", str(MAX_NEW), "--json")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # exactly one JSON object, nothing streamed
    return json.loads(lines[0])


# --- generation -----------------------------------------------------------------------------


def test_json_output(greedy_json):
    assert set(greedy_json) == {"text", "tokens", "stats"}
    tokens, stats = greedy_json["tokens"], greedy_json["stats"]
    assert 1 <= len(tokens) <= MAX_NEW and all(isinstance(t, int) for t in tokens)
    assert STATS_KEYS <= set(stats), stats
    assert stats["new_tokens"] == len(tokens)
    assert isinstance(greedy_json["text"], str)


def test_json_tokens_equal_library_api(greedy_json, loaded):
    import jaxspec

    prompt = encode_prompt(loaded, PROMPT, chat_template=True)
    out = jaxspec.SpeculativeDecoder(loaded, None).generate([prompt], max_new_tokens=MAX_NEW)
    assert greedy_json["tokens"] == out.tokens[0]
    assert greedy_json["stats"]["prompt_tokens"] == len(prompt)
    expected = [t for t in out.tokens[0] if t not in loaded.config.eos_token_ids]
    assert greedy_json["text"] == loaded.tokenizer.decode(expected, skip_special_tokens=True,
                                                          clean_up_tokenization_spaces=False)


def test_streams_text(model_dir, greedy_json):
    done = cli(PROMPT, "--model", model_dir, "--max-new-tokens", str(MAX_NEW))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.endswith("\n")
    assert done.stdout[:-1] == greedy_json["text"]
    stats = [line for line in done.stderr.splitlines() if line.startswith("[jaxspec]")]
    assert len(stats) == 1 and "tok/s" in stats[0] and "compile" in stats[0], done.stderr
    assert f"{len(greedy_json['tokens'])} new tokens" in stats[0]


def test_verbose_prints_device_plan_and_startup(model_dir, capsys):
    assert cli_module.main([PROMPT, "--model", model_dir, "--max-new-tokens", "4",
                            "--verbose"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[jaxspec] device ") and err[1] == "[jaxspec] memory plan:"
    startup = [line for line in err if line.startswith("[jaxspec] start-up: model ")]
    assert len(startup) == 1 and " s, programs " in startup[0], err
    assert "from the program cache" in startup[0]


def test_json_with_draft_accepts_everything(model_dir, greedy_json):
    done = cli(PROMPT, "--model", model_dir, "--draft", model_dir, "--num-speculative-tokens",
               "3", "--max-new-tokens", str(MAX_NEW), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    stats = result["stats"]
    assert (STATS_KEYS | DRAFT_STATS_KEYS) <= set(stats), stats
    assert result["tokens"] == greedy_json["tokens"]  # speculation changes no token
    assert stats["acceptance_rate"] == 1.0
    assert stats["mean_accepted_length"] > 1
    assert len(stats["accepted_per_position"]) == 3
    assert stats["draft_forward_calls"] > 0
    assert stats["target_forward_calls"] < 1 + len(result["tokens"])
    assert "acceptance rate 100.0%" in done.stderr


def test_without_torch_sampling_raw_prompt(model_dir, loaded, tmp_path):
    """`import torch` fails; also covers sampling flags and --no-chat-template."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text('raise ImportError("torch blocked")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0  # the block works
    sampling = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    done = cli(PROMPT, "--model", model_dir, "--max-new-tokens", str(MAX_NEW), "--json",
               "--no-chat-template", *sampling, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    raw = loaded.tokenizer.encode(PROMPT)
    assert result["stats"]["prompt_tokens"] == len(raw)
    assert 1 <= len(result["tokens"]) <= MAX_NEW

    import jaxspec

    decoder = jaxspec.SpeculativeDecoder(loaded, **cli_module.streaming(None))
    out = decoder.generate([raw], max_new_tokens=MAX_NEW, temperature=0.8, top_k=20, top_p=0.9,
                           seed=3)
    assert result["tokens"] == out.tokens[0]


def test_the_cli_never_imports_transformers(model_dir, greedy_json, tmp_path):
    """Its tokenizer is a LightTokenizer (the same ids and text: test_json_tokens_equal_...
    compares them with transformers')."""
    (tmp_path / "transformers").mkdir()
    (tmp_path / "transformers" / "__init__.py").write_text(
        'raise ImportError("transformers blocked")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    done = cli(PROMPT, "--model", model_dir, "--max-new-tokens", str(MAX_NEW), "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"] == greedy_json["tokens"]


def test_help():
    done = cli("--help")
    assert done.returncode == 0
    for flag in ("--model", "--draft", "--num-speculative-tokens", "--max-new-tokens",
                 "--temperature", "--top-p", "--top-k", "--seed", "--dtype", "--json",
                 "--no-chat-template"):
        assert flag in done.stdout


def test_module_imports_are_light():
    """jax, the API and the checkpoint loaders are imported inside run(), not at import."""
    code = ("import sys, jaxspec.generate; "
            "print(sorted(m for m in ('jax', 'flax', 'transformers', 'jaxspec.api') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- bad input ------------------------------------------------------------------------------

CHEAP_BAD = {  # fail before any model is loaded
    "empty prompt": [""],
    "whitespace prompt": [" \n\t "],
    "max-new-tokens 0": ["hi", "--max-new-tokens", "0"],
    "max-new-tokens negative": ["hi", "--max-new-tokens", "-5"],
    "negative temperature": ["hi", "--temperature", "-0.5"],
    "nan temperature": ["hi", "--temperature", "nan"],
    "top-p 0": ["hi", "--top-p", "0"],
    "top-p above 1": ["hi", "--top-p", "1.5"],
    "negative top-k": ["hi", "--top-k", "-1"],
    "zero speculative tokens": ["hi", "--num-speculative-tokens", "0"],
    "33 speculative tokens": ["hi", "--num-speculative-tokens", "33"],
    "negative seed": ["hi", "--seed", "-1"],
    "seed above u32": ["hi", "--seed", str(2**32)],
    "infinite temperature": ["hi", "--temperature", "inf"],
    "top-k above i32": ["hi", "--top-k", str(2**31)],
    "max-new-tokens above i32": ["hi", "--max-new-tokens", str(2**31)],
    "tp 0": ["hi", "--tp", "0"],
    "dp 2": ["hi", "--dp", "2"],
    "missing model": ["hi", "--model", "/nonexistent/model"],
    "missing draft": ["hi", "--draft", "/nonexistent/draft"],
    "system without the template": ["hi", "--system", "Be brief.", "--no-chat-template"],
}
ARGPARSE_BAD = {
    "no prompt": [],
    "non-integer max-new-tokens": ["hi", "--max-new-tokens", "abc"],
    "unknown dtype": ["hi", "--dtype", "float16"],
    "unknown flag": ["hi", "--beam-width", "4"],
}


@pytest.mark.parametrize("argv", CHEAP_BAD.values(), ids=CHEAP_BAD.keys())
def test_bad_input_in_process(argv, model_dir, capsys):
    has_model = "--model" in argv
    code = cli_module.main(argv + ([] if has_model else ["--model", model_dir]))
    assert_user_error(code, *capsys.readouterr())


@pytest.mark.parametrize("argv", ARGPARSE_BAD.values(), ids=ARGPARSE_BAD.keys())
def test_usage_errors_in_process(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_module.main(argv)
    assert_user_error(exc.value.code, *capsys.readouterr())


def test_bad_model_files_in_process(model_dir, tmp_path, capsys):
    """Errors found while loading or encoding: one line, exit 2, no compile needed."""
    not_gguf = tmp_path / "draft.gguf"
    not_gguf.write_text("not a gguf file")
    no_tokenizer = tiny_hf_model("llama", tmp_path, with_tokenizer=False)
    other_tokenizer = shutil.copytree(model_dir, tmp_path / "other_tokenizer")
    tokenizer_file = other_tokenizer / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[3:5]  # two ordinary tokens swap ids
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_file.write_text(json.dumps(spec))
    capsys.readouterr()  # drop the builder's progress output
    cases = {
        "draft with another tokenizer": (
            ["hi", "--model", model_dir, "--draft", str(other_tokenizer)], ("tokenizer",)),
        "speculative too long": (["hi", "--model", model_dir, "--draft", model_dir,
                                  "--max-new-tokens", "240"], ("240", "256")),
        "too long": (["hi", "--model", model_dir, "--max-new-tokens", "1000"], ("1000", "256")),
        "model dir without checkpoint": (["hi", "--model", str(tmp_path)], ()),
        "draft not a checkpoint": (["hi", "--model", model_dir, "--draft", str(not_gguf)], ()),
        "no tokenizer": (["hi", "--model", no_tokenizer], ("tokenizer",)),
    }
    for name, (argv, words) in cases.items():
        code = cli_module.main(argv)
        out, err = capsys.readouterr()
        assert_user_error(code, out, err)
        assert all(w in err for w in words), (name, err)


def test_bad_input_subprocesses(model_dir):
    """The real entry point: exit status 2 and one `error:` line, never a traceback."""
    cases = [
        ["   "],
        ["hi", "--model", model_dir, "--draft", "/nonexistent/draft"],
        ["hi", "--max-new-tokens", "many"],
        ["hi", "--temperature", "inf"],
        ["hi", "--top-k", str(2**31), "--seed", "-1"],
        ["hi", "--model", model_dir, "--max-new-tokens", "1000"],  # loads the model first
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda argv: cli(*argv, timeout=300), cases))
    for argv, done in zip(cases, results):
        assert_user_error(done.returncode, done.stdout, done.stderr)
    assert "1000" in results[-1].stderr and "256" in results[-1].stderr


def test_prompt_that_is_not_utf8(model_dir, greedy_json):
    """Invalid bytes in argv become U+FFFD with one warning line; the run succeeds."""
    prompt = PROMPT.encode() + b" \xff\xfe \xc3"
    done = subprocess.run([sys.executable, "-m", "jaxspec.generate", prompt, "--model", model_dir,
                           "--max-new-tokens", "2", "--json"], cwd=REPO, capture_output=True,
                          timeout=600)
    err = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err, err
    assert err.splitlines()[0] == ("warning: the prompt is not valid UTF-8: replaced 3 invalid "
                                   "byte sequence(s) with U+FFFD")
    out = json.loads(done.stdout)
    assert out["stats"]["prompt_tokens"] > greedy_json["stats"]["prompt_tokens"]


def test_prompt_from_stdin(model_dir, greedy_json):
    """'-' reads the prompt from stdin, trailing newlines dropped: the same run as argv's."""
    done = cli("-", "--model", model_dir, "--max-new-tokens", str(MAX_NEW), "--json",
               stdin=PROMPT + "\n\n")
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["tokens"] == greedy_json["tokens"]
    assert out["stats"]["prompt_tokens"] == greedy_json["stats"]["prompt_tokens"]


def test_empty_stdin_is_one_line(model_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n")))
    code = cli_module.main(["-", "--model", model_dir])
    assert_user_error(code, *capsys.readouterr())


def test_utf8_text():
    assert cli_module.utf8_text("héllo \ufffd") == ("héllo \ufffd", 0)
    broken = b"a\xffb\xe2\x9c".decode("utf-8", "surrogateescape")
    assert cli_module.utf8_text(broken) == ("a\ufffdb\ufffd", 2)


@pytest.mark.parametrize("template", ["{{ raise_exception('no system role') }}",
                                      "{{ messages[0]['content'] + 1 }}",
                                      "{% for m in messages %}{{ m.x.y }}{% endfor %}"])
def test_chat_template_that_fails_is_one_line(model_dir, tmp_path, template, capsys):
    broken = shutil.copytree(model_dir, tmp_path / "broken_template")
    (broken / "chat_template.jinja").write_text(template)
    code = cli_module.main(["hi", "--model", str(broken), "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert_user_error(code, out, err)
    assert "chat template" in err and "--no-chat-template" in err


# --- streaming and prompt encoding (no subprocess) ----------------------------------------------


class _BytesTokenizer:
    """Each token id is one byte; decode shows incomplete UTF-8 as U+FFFD (like byte-level BPE)."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")


class _Sink:
    def __init__(self):
        self.writes: list[str] = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_text_stream_holds_back_incomplete_characters():
    sink = _Sink()
    stream = cli_module.TextStream(_BytesTokenizer(), eos_ids=[0], out=sink)
    data = list("héllo ✓".encode())
    for n in range(1, len(data) + 1):
        stream.update(data[:n])
    stream.update(data + [0], final=True)  # EOS never printed
    assert "".join(sink.writes) == "héllo ✓"
    assert all("\ufffd" not in w for w in sink.writes)
    assert len(sink.writes) > 1  # streamed in pieces


def test_text_stream_flushes_a_dangling_byte_at_the_end():
    sink = _Sink()
    stream = cli_module.TextStream(_BytesTokenizer(), eos_ids=[], out=sink)
    data = list("ok".encode()) + [0xE2]  # a cut multi-byte character
    stream.update(data)
    assert "".join(sink.writes) == "ok"
    stream.update(data, final=True)
    assert "".join(sink.writes) == "ok\ufffd"


def test_encode_prompt_chat_template_and_raw(loaded):
    tokenizer = loaded.tokenizer
    chat = encode_prompt(loaded, PROMPT, chat_template=True)
    raw = encode_prompt(loaded, PROMPT, chat_template=False)
    assert raw == tokenizer.encode(PROMPT)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                             add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(chat) == rendered
    assert len(chat) > len(raw)


def test_encode_prompt_with_a_system_message(loaded, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    rendered = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=False)
    ids = encode_prompt(loaded, PROMPT, chat_template=True, system="Be brief.")
    assert loaded.tokenizer.decode(ids) == rendered and "Be brief." in rendered
    assert ids != encode_prompt(loaded, PROMPT, chat_template=True)
    with pytest.raises(UserError, match="needs a chat template: the prompt is encoded raw"):
        encode_prompt(loaded, PROMPT, chat_template=False, system="Be brief.")
    import dataclasses

    class NoTemplate:
        chat_template = None

        def encode(self, text):
            return [1]

    with pytest.raises(UserError, match="has none"):
        encode_prompt(dataclasses.replace(loaded, tokenizer=NoTemplate()), PROMPT,
                      chat_template=True, system="Be brief.")


# --- the real default model -----------------------------------------------------------------


@pytest.mark.slow
def test_default_model_end_to_end():
    done = cli("What is the capital of France? Answer in one sentence.", "--max-new-tokens", "16",
               timeout=1800)
    assert done.returncode == 0, done.stderr
    text = done.stdout.strip()
    words = text.split()
    assert len(words) >= 3, text
    letters = sum(c.isascii() and (c.isalpha() or c in " .,'!?-") for c in text)
    assert letters / len(text) > 0.8, text
    assert any(w.strip(".,!?").lower() in {"the", "is", "of", "paris", "capital", "france"}
               for w in words), text
