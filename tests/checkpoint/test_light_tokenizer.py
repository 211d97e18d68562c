"""LightTokenizer against transformers' PreTrainedTokenizerFast.from_pretrained (the reference):
encode, decode, vocabulary size, BOS/EOS ids and chat templates, on the tiny test tokenizer, a
tokenizer rebuilt from GGUF metadata, a WordPiece one with legacy config files and, where it is
cached, the default model's; and loading it imports no transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import BOS_ID, CHAT_TEMPLATE, EOS_ID, REPO, SPECIALS, save_tiny_tokenizer, tiny_vocab

from jaxspec.checkpoint import default_model
from jaxspec.checkpoint.light_tokenizer import LightTokenizer
from jaxspec.errors import UserError


TEXTS = [
    "Hello world", "", " ", "   leading and trailing   ", "multiple   spaces\tand\t\ttabs",
    "line one\nline two\n\n\nthree\r\n", "digits 1234567890 3.14159 -42 007",
    "unicode: héllo wörld, 你好, Привет 🙂👍🏽", "<|im_start|>user\nhi<|im_end|>\n",
    "a<|endoftext|>b<|im_end|><|im_start|>", "[CLS] the cat [MASK] sat [SEP] <tool> <image>",
    "it's the cat's mat , isn't it ? yes ! don't", "x = f(42) + 3.5\nreturn x",
]

# --- chat templates ---------------------------------------------------------------------------

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
TOJSON = (
    "{% for message in messages %}{{ message | tojson }}\n"
    "{{ message['content'] | tojson(indent=2) }}\n{% endfor %}"
    "{{ messages | tojson(sort_keys=True, separators=(',', ':')) }}\n"
    "{{ {'html': '<b>&\"</b>', 'eos': eos_token, 'n': [1, 2.5, none, true]} | tojson }}")
STRICT_ROLES = (
    "{% for message in messages %}{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('Unexpected role: ' + message['role']) }}{% endif %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")
# Indented blocks (trim_blocks, lstrip_blocks), namespace, loop.last, continue/break, the
# generation tag, dict, strftime_now and the special and model-specific tokens.
NAMESPACE = """{%- set ns = namespace(system='', turns=0) -%}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% set ns.system = message.content %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    [{{ ns.turns }}] {{ message.role }}:
    {% if message.role == 'assistant' %}
        {% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}
    {% else %}
        {{ message.content }}
    {% endif %}
    {% if loop.last %}(last of {{ loop.length }}){% endif %}
    {% if ns.turns > 5 %}{% break %}{% endif %}
{% endfor %}
{% if ns.system %}system was: {{ ns.system }}{% endif %}
{% set d = dict(a=1, b=unk_token) %}{{ d | tojson }} {{ pad_token }} {{ image_token }} \
{{ strftime_now('%Y') }} {{ dict.fromkeys(['x'], 0) }}
{% if add_generation_prompt %}
assistant:
{% endif %}
"""
REASONING = (
    "{% for m in messages %}{{ m.role }}|{{ m.reasoning_content | default('-') }}|"
    "{{ m.thinking | default('-') }}|{{ 'tool_calls' in m }}|{{ m.content }}\n{% endfor %}"
    "{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }}")
TEMPLATES = {"smollm2": SMOLLM2, "llama3": LLAMA3, "tojson": TOJSON, "strict_roles": STRICT_ROLES,
             "namespace": NAMESPACE, "reasoning": REASONING}

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Wie geht's? 你好 🙂"},
     {"role": "assistant", "content": "  Gut, danke. <b>&</b>  "},
     {"role": "user", "content": "  spaces  \n\nnewlines\t"}],
    [{"role": "user", "content": "2+2?", "tool_calls": None},
     {"role": "assistant", "content": "4", "reasoning": "Adding: 2+2=4."},
     {"role": "user", "content": "ok"}],
]

# --- tokenizer directories ------------------------------------------------------------------


def write_files(path, files: dict) -> str:
    """Write {name: bytes | str | JSON value} into path (made if needed)."""
    os.makedirs(path, exist_ok=True)
    for name, data in files.items():
        if not isinstance(data, (bytes, str)):
            data = json.dumps(data, ensure_ascii=False)
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def write_tokenizer_gguf(path: str) -> str:
    """A GGUF holding only tokenizer metadata: the tiny vocabulary with llama3's pre-tokenizer,
    BOS added, one user-defined token."""
    import gguf

    vocab, merges = tiny_vocab()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(list(vocab))
    writer.add_token_types([3 if t in SPECIALS else 4 if t == "Ġt" else 1 for t in vocab])
    writer.add_token_merges([" ".join(m) for m in merges])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def wordpiece_files() -> dict:
    """A WordPiece tokenizer (not BPE: decode's space clean-up applies) whose special tokens come
    from the legacy special_tokens_map.json and added_tokens.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat",
             "hello", "world", "it", "'", "s", "n", "t", ".", ",", "!", "?", "##s", "##ing",
             "don", "isn", "yes", "a", "b", "1", "2", "3", "4", "x", "=", "(", ")", "+", "<",
             ">", "|", "_", "-", "im", "##_", "start", "end"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    mask = {"content": "[MASK]", "lstrip": True, "rstrip": False, "normalized": False,
            "single_word": False}
    return {
        "tokenizer.json": tok.to_str(),
        "tokenizer_config.json": {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                  "clean_up_tokenization_spaces": True, "model_max_length": 512},
        "special_tokens_map.json": {"unk_token": "[UNK]", "sep_token": "[SEP]",
                                    "pad_token": "[PAD]", "cls_token": "[CLS]",
                                    "mask_token": mask, "additional_special_tokens": ["<tool>"]},
        "added_tokens.json": {"<new>": 60},
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    save_tiny_tokenizer(path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    return path


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    from gguf import GGUFReader

    from jaxspec.checkpoint.tokenizer import gguf_tokenizer_files

    path = tmp_path_factory.mktemp("gguf")
    reader = GGUFReader(write_tokenizer_gguf(str(path / "tok.gguf")))
    return write_files(path / "tokenizer", gguf_tokenizer_files(reader))


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("wordpiece"), wordpiece_files())


@pytest.fixture(scope="module")
def smollm2_dir():
    directory = default_model.converted_dir()  # in $JAXSPEC_CACHE, converted on first use
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        pytest.skip(f"the default model is not converted in {directory}")
    return directory


def read_all(path) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def both(path):
    """(ours, transformers') tokenizer of the directory."""
    from transformers import PreTrainedTokenizerFast

    return LightTokenizer.from_dir(path), PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="module", params=["tiny", "gguf", "wordpiece", "smollm2"])
def pair(request):
    return both(request.getfixturevalue(f"{request.param}_dir"))


@pytest.fixture(scope="module")
def tiny_files(tiny_dir):
    with open(os.path.join(tiny_dir, "tokenizer.json"), "rb") as f:
        return {"tokenizer.json": f.read()}


def template_dir(tmp_path, tiny_files, template, **config) -> str:
    """The tiny tokenizer with the template in tokenizer_config.json, special tokens (some not in
    the vocabulary, so added) and a model-specific one."""
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<pad>",
              "unk_token": "<|endoftext|>", "image_token": "<image>",
              "additional_special_tokens": ["<tool>"], "chat_template": template, **config}
    return write_files(tmp_path, {**tiny_files, "tokenizer_config.json": config})


# --- tests ----------------------------------------------------------------------------------


def test_encode_matches_transformers(pair):
    ours, theirs = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(
                text, add_special_tokens=special), (text, special)


def test_decode_matches_transformers(pair):
    ours, theirs = pair
    sequences = [theirs.encode(t) for t in TEXTS] + [list(range(len(theirs)))[::-1], [0], []]
    for ids in sequences:
        for skip in (False, True):
            for clean in (None, True, False):
                assert ours.decode(ids, skip_special_tokens=skip,
                                   clean_up_tokenization_spaces=clean) == theirs.decode(
                    ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean), (ids, skip)


def test_vocabulary_and_special_tokens_match_transformers(pair):
    ours, theirs = pair
    assert len(ours) == len(theirs)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.special_tokens == theirs.special_tokens_map
    assert ours.chat_template == theirs.chat_template


def test_default_chat_template_matches_transformers(pair):
    ours, theirs = pair
    if theirs.chat_template is None:
        return
    for chat in CHATS:
        for prompt in (False, True):
            text = ours.apply_chat_template(chat, add_generation_prompt=prompt)
            assert text == theirs.apply_chat_template(chat, add_generation_prompt=prompt,
                                                      tokenize=False)
            assert ours.encode(text, add_special_tokens=False) == theirs.encode(
                text, add_special_tokens=False)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_templates_match_transformers(name, tmp_path, tiny_files):
    ours, theirs = both(template_dir(tmp_path, tiny_files, TEMPLATES[name]))
    assert len(ours) == len(theirs) > 100  # <pad>, <image>, ... added
    assert ours.encode("<image><tool> <pad>x") == theirs.encode("<image><tool> <pad>x")
    for chat in CHATS:
        for prompt in (False, True):
            assert ours.apply_chat_template(chat, add_generation_prompt=prompt) == \
                theirs.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)


def _added(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": not special,
            "single_word": False, "special": special}


CONFIG_VARIANTS = {
    # Tokens marked not special (the named ones, EOS and PAD, become special) and one not in
    # tokenizer.json: all added to the backend again.
    "added_tokens_decoder": {"pad_token": "<extra>", "added_tokens_decoder": {
        "1": _added("<|im_start|>", False), "2": _added("<|im_end|>", False),
        "100": _added("<extra>", False)}},
    "additional_and_empty_extra": {"extra_special_tokens": [],
                                   "additional_special_tokens": ["<extra>"]},
    "split_special_tokens": {"split_special_tokens": True},
    "clean_up_on_bpe": {"clean_up_tokenization_spaces": True},  # transformers ignores it for BPE
    "serialized_added_token": {"bos_token": {
        "__type": "AddedToken", **_added("<|im_start|>", True)}, "eos_token": None},
}


@pytest.mark.parametrize("variant", sorted(CONFIG_VARIANTS))
def test_config_variants_match_transformers(variant, tmp_path, tiny_files):
    ours, theirs = both(template_dir(tmp_path, tiny_files, SMOLLM2, **CONFIG_VARIANTS[variant]))
    assert len(ours) == len(theirs)
    assert ours.special_tokens == theirs.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in [*TEXTS, "<extra> it's ok ."]:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip)


def test_failing_templates_raise_user_error(tmp_path, tiny_files):
    chat = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    ours, theirs = both(template_dir(tmp_path / "roles", tiny_files, STRICT_ROLES))
    with pytest.raises(Exception, match="Unexpected role: tool"):
        theirs.apply_chat_template(chat, tokenize=False)
    with pytest.raises(UserError, match="the chat template failed: .*Unexpected role: tool"):
        ours.apply_chat_template(chat)
    for template in ("{{ undefined_function() }}", "{% for m in messages %}{{ m.content",
                     "{{ messages.__class__.__subclasses__() }}",
                     "{{ messages.append(1) }}", "{% set ns = namespace(_x=1) %}"):
        ours, theirs = both(template_dir(tmp_path / str(hash(template)), tiny_files, template))
        with pytest.raises(Exception):
            theirs.apply_chat_template(chat, tokenize=False)
        with pytest.raises(UserError, match="the chat template failed") as e:
            ours.apply_chat_template(chat)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no messages"):
        ours.apply_chat_template([])


def test_no_chat_template(tmp_path, tiny_files):
    ours, theirs = both(write_files(tmp_path, {**tiny_files, "tokenizer_config.json": {
        "eos_token": "<|im_end|>"}, "chat_template.json": {"chat_template": SMOLLM2}}))
    assert ours.chat_template is None and theirs.chat_template is None  # .json: processors only
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    with pytest.raises(UserError, match="the tokenizer has no chat template"):
        ours.apply_chat_template(CHATS[0])


@pytest.mark.parametrize("layout", ["jinja_over_config", "named_list", "template_folder",
                                    "named_without_default"])
def test_chat_template_sources_match_transformers(layout, tmp_path, tiny_files):
    crlf = LLAMA3.replace("\n", "\r\n").encode("utf-8")  # text-mode reads turn it into "\n"
    named = [{"name": "tool_use", "template": TOJSON}, {"name": "default", "template": SMOLLM2}]
    files = {"jinja_over_config": {"chat_template.jinja": crlf},
             "named_list": {},
             "template_folder": {"chat_template.jinja": SMOLLM2,
                                 "additional_chat_templates/tool_use.jinja": TOJSON},
             "named_without_default": {"additional_chat_templates/tool_use.jinja": TOJSON}}[layout]
    config_template = named if layout == "named_list" else NAMESPACE
    path = template_dir(tmp_path, tiny_files, config_template)
    ours, theirs = both(write_files(path, files))
    if layout == "named_without_default":
        assert ours.chat_template is None and theirs.chat_template == {"tool_use": TOJSON}
        with pytest.raises(UserError, match="tool_use"):
            ours.apply_chat_template(CHATS[0])
        return
    expected = theirs.get_chat_template()
    assert ours.chat_template == expected and expected in (LLAMA3, SMOLLM2)
    assert ours.apply_chat_template(CHATS[1], add_generation_prompt=True) == \
        theirs.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False)


def test_from_files_matches_from_dir(tiny_dir, wordpiece_dir):
    assert LightTokenizer.from_files({}) is None
    for path in (tiny_dir, wordpiece_dir):
        a, b = LightTokenizer.from_dir(path), LightTokenizer.from_files(read_all(path))
        assert (len(a), a.special_tokens, a.chat_template) == (len(b), b.special_tokens,
                                                                b.chat_template)
        assert [a.encode(t) for t in TEXTS] == [b.encode(t) for t in TEXTS]


def test_missing_or_bad_files(tmp_path, tiny_files):
    assert LightTokenizer.from_dir(str(tmp_path)) is None
    with pytest.raises(UserError, match="cannot read tokenizer.json"):
        LightTokenizer.from_files({"tokenizer.json": b"{not json"})
    with pytest.raises(UserError, match="cannot read tokenizer_config.json"):
        LightTokenizer.from_files({**tiny_files, "tokenizer_config.json": b"{"})


def test_loads_and_renders_without_transformers(tiny_dir):
    code = ("import sys\n"
            "from jaxspec.checkpoint.light_tokenizer import LightTokenizer\n"
            "tok = LightTokenizer.from_dir(sys.argv[1])\n"
            "text = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], True)\n"
            "assert tok.decode(tok.encode(text)) == text\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
            "print(repr(text))")
    out = subprocess.run([sys.executable, "-c", code, tiny_dir], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    _, theirs = both(tiny_dir)
    assert out.stdout.strip() == repr(theirs.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False))
