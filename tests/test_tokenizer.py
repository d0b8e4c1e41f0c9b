"""o200k_harmony (gptoss.tokenizer) against the spec's facts (§5.1), tiktoken's own definition of
the encoding, and an independent BPE implementation (bpe-openai's Rust tokenizer)."""
import hashlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tiktoken")
pytest.importorskip("bpe_openai")

from gptoss import tokenizer as tk  # noqa: E402

# Text that exercises every branch of the pre-tokenizer: cased and uncased letters, contractions,
# digit runs, punctuation runs, the whitespace forms, other scripts, combining marks and emoji.
PIECES = ["Hello", "world", "GPT", "oss", "don't", "I'M", "we'll", "x", "12345", "3.14", "2026", " ", "  ", "\t", "\n",
          "\r\n", "\n\n", "!", "?!", "...", "(", ")", "{", "}", "<|", "|>", "://", "#", "_", "é", "e\u0301", "Straße",
          "Привет", "мир", "你好", "世界", "مرحبا", "नमस्ते", "🙂", "👍🏽", "\u00a0", "ǅungla", "ＡＢＣ"]
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=24).map("".join)


@pytest.fixture(scope="module")
def tok():
    return tk.Tokenizer()


def test_spec_facts(tok):
    # spec §5.1: vocabulary size, the special-token table, the known ids
    assert tok.vocab_size == len(tok) == tk.VOCAB_SIZE == 201088
    assert tok.encode("hello world") == [24912, 2375]
    table = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
             "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
             "<|call|>": 200012, "<|reserved_200000|>": 200000, "<|reserved_200013|>": 200013,
             "<|reserved_201087|>": 201087}
    for name, i in table.items():
        assert tok.encode(name, allowed_special="all") == [i], name
        assert tok.decode([i]) == name
    assert (tok.start, tok.end, tok.message, tok.channel) == (200006, 200007, 200008, 200005)
    assert tok.assistant_stop_tokens == (200002, 200012)
    # single tokens after <|start|> / <|channel|> in Harmony's own example
    assert [tok.encode(w) for w in ("analysis", "assistant", "final")] == [[35644], [173781], [17196]]
    assert tok.is_special(199998) and not tok.is_special(199997)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_stream_decoder_pieces_join_to_the_text(tok, text):
    ids = tok.encode(text)
    feed = tok.stream_decoder()
    pieces = [feed(i) for i in ids]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)  # no character was cut in two


def test_stream_decoder_holds_split_characters(tok):
    for ch in ("🦫", "𓀀", "ꙮ"):  # one character, several byte-level tokens
        ids = tok.encode(ch)
        assert len(ids) > 1
        feed = tok.stream_decoder()
        assert [feed(i) for i in ids] == [""] * (len(ids) - 1) + [ch]


def test_special_text_is_plain_text_unless_allowed(tok):
    ids = tok.encode("<|start|>user")
    assert tok.start not in ids and tok.decode(ids) == "<|start|>user"
    assert tok.encode("<|start|>user", allowed_special={"<|start|>"}) == [tok.start] + tok.encode("user")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_round_trip_and_independent_bpe(tok, text):
    import bpe_openai
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < 199998 for i in ids)
    # the same ids from a BPE written independently (bpe-openai, Rust) on the same ranks
    assert bpe_openai.get_encoding("o200k_base").encode_ordinary(text) == ids


def test_matches_tiktoken_definition(tmp_path, monkeypatch, tok):
    """tiktoken's own o200k_harmony() (tiktoken_ext.openai_public), its download served from
    tiktoken's file cache: same regex, same special tokens, same ids."""
    import tiktoken
    import tiktoken.registry
    from tiktoken_ext import openai_public
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    data = (tk.vocab_dir() / tk.O200K_BASE_FILE).read_bytes()
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)  # tiktoken's cache key
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    spec = openai_public.o200k_harmony()
    assert spec["pat_str"] == tk.PAT_STR
    assert spec["special_tokens"] == tk.special_tokens()
    ref = tiktoken.Encoding(**{k: spec[k] for k in ("name", "pat_str", "mergeable_ranks", "special_tokens")})
    assert ref.n_vocab == tok.vocab_size
    sample = "".join(PIECES) + " <|start|>assistant<|channel|>final<|message|>ok<|return|>"
    assert ref.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all")
    assert ref.encode(sample, disallowed_special=()) == tok.encode(sample)


def test_bad_input(tok):
    with pytest.raises(ValueError, match=r"ids must be in \[0, 201088\)"):
        tok.decode([5, 201088])
    with pytest.raises(ValueError, match="ids must be"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="vocab_size 1000"):
        tk.check_vocab(1000)
    tk.check_vocab(201088)


def test_vocab_file_checked_and_rewritten(tmp_path, monkeypatch):
    # a corrupt cached file is replaced from bpe-openai's copy; the result has the published hash
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path))
    (tmp_path / tk.O200K_BASE_FILE).write_bytes(b"not the ranks")
    folder = tk.vocab_dir()
    assert folder == tmp_path
    data = (tmp_path / tk.O200K_BASE_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == tk.O200K_BASE_SHA256
    assert not [p for p in os.listdir(tmp_path) if p != tk.O200K_BASE_FILE]  # no temporary left behind
