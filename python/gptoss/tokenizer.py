"""The o200k_harmony tokenizer of gpt-oss (spec §5.1), offline.

tiktoken's own `get_encoding("o200k_harmony")` downloads o200k_base's BPE ranks; here they come
from the byte-identical copy packaged in `bpe-openai` (checked against the published sha256),
written once to a cache folder. The encoding is o200k_base's ranks and pre-tokenizer regex plus the
harmony special tokens (ids 199998..201087, so n_vocab = 201088 = the model's vocab_size). The same
folder serves openai-harmony, which reads `o200k_base.tiktoken` from TIKTOKEN_ENCODINGS_BASE
(gptoss.harmony).
"""
import codecs
import functools
import gzip
import hashlib
import os
import tempfile
from pathlib import Path
from typing import AbstractSet, Callable, List, Literal, Sequence, Union

O200K_BASE_FILE = "o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_SIZE = 201088  # n_vocab of o200k_harmony = gpt-oss vocab_size

# o200k_base's pre-tokenizer: seven alternatives joined with "|" (spec §5.1).
PAT_STR = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# The named special tokens (spec §5.1 table); every other id in 200000..201087 is <|reserved_{id}|>.
# 200018 is <|endofprompt|> (o200k_base's own) and, as in tiktoken, also <|reserved_200018|>.
NAMED_SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
RESERVED_IDS = [200000, 200001, 200004, 200009, 200010, 200011] + list(range(200013, VOCAB_SIZE))


def special_tokens() -> dict:
    """name -> id for every special token of o200k_harmony."""
    return {**NAMED_SPECIAL_TOKENS, **{f"<|reserved_{i}|>": i for i in RESERVED_IDS}}


def cache_dir() -> Path:
    """Where the vocabulary file is kept: $GPTOSS_CACHE, else $XDG_CACHE_HOME/gptoss, else
    ~/.cache/gptoss."""
    if os.environ.get("GPTOSS_CACHE"):
        return Path(os.environ["GPTOSS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptoss"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vocab_dir() -> Path:
    """A folder holding o200k_base.tiktoken (sha256-checked), written from bpe-openai's packaged
    copy on first use. FileNotFoundError if neither a valid cached file nor bpe-openai exists."""
    folder = cache_dir()
    path = folder / O200K_BASE_FILE
    if path.is_file() and _sha256(path.read_bytes()) == O200K_BASE_SHA256:
        return folder
    try:
        from importlib import resources
        packaged = resources.files("bpe_openai") / "data" / (O200K_BASE_FILE + ".gz")
        data = gzip.decompress(packaged.read_bytes())
    except (ImportError, FileNotFoundError) as e:
        raise FileNotFoundError("the o200k_harmony tokenizer needs o200k_base's BPE ranks: install bpe-openai "
                           f"(requirements/base.txt) or place {O200K_BASE_FILE} (sha256 {O200K_BASE_SHA256}) "
                           f"in {folder}") from e
    if _sha256(data) != O200K_BASE_SHA256:
        raise ValueError(f"bpe-openai's {O200K_BASE_FILE} has sha256 {_sha256(data)}, expected {O200K_BASE_SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=O200K_BASE_FILE + ".")
    with os.fdopen(fd, "wb") as f:  # written whole, then renamed: a reader never sees half a file
        f.write(data)
    os.replace(tmp, path)
    return folder


@functools.lru_cache(maxsize=None)
def o200k_harmony():
    """The tiktoken Encoding o200k_harmony (n_vocab 201088), built without network access."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(str(vocab_dir() / O200K_BASE_FILE), expected_hash=O200K_BASE_SHA256)
    return tiktoken.Encoding(name="o200k_harmony", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens=special_tokens())


class Tokenizer:
    """Text <-> token ids for gpt-oss (o200k_harmony).

    encode() treats special-token text in the input as plain text unless `allowed_special` names it
    ("all" for every one); decode() renders special tokens by name. The ids of the Harmony format's
    tokens are attributes (start, end, message, channel, ...)."""

    def __init__(self):
        self.encoding = o200k_harmony()
        self.vocab_size = self.encoding.n_vocab
        ids = NAMED_SPECIAL_TOKENS
        self.startoftext, self.endoftext = ids["<|startoftext|>"], ids["<|endoftext|>"]
        self.start, self.end, self.message = ids["<|start|>"], ids["<|end|>"], ids["<|message|>"]
        self.channel, self.constrain = ids["<|channel|>"], ids["<|constrain|>"]
        self.return_, self.call = ids["<|return|>"], ids["<|call|>"]
        # What ends an assistant turn when sampling (spec §5.2, stop_tokens_for_assistant_actions).
        self.assistant_stop_tokens = (self.return_, self.call)

    def encode(self, text: str, allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset()) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: text must be a str, got {type(text).__name__}")
        # disallowed_special=(): special-token text that is not allowed is encoded as ordinary text
        return self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())

    def decode(self, ids: Sequence[int], errors: str = "replace") -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Tokenizer.decode: ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return self.encoding.decode(ids, errors=errors)

    def stream_decoder(self) -> Callable[[int], str]:
        """A function that takes the tokens of a text one at a time and returns the text each one
        completes: UTF-8 characters split across tokens come out whole, with the token that ends
        them (so the pieces joined equal decode(tokens))."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(token: int) -> str:
            return utf8.decode(self.encoding.decode_single_token_bytes(int(token)))
        return feed

    def is_special(self, token: int) -> bool:
        return int(token) >= self.startoftext

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(o200k_harmony, vocab_size={self.vocab_size})"


def check_vocab(model_vocab_size: int, tokenizer_vocab: int = VOCAB_SIZE, what: str = "model") -> None:
    """A clear error when a model's embedding cannot take o200k_harmony's ids."""
    if model_vocab_size < tokenizer_vocab:
        raise ValueError(f"the o200k_harmony tokenizer has {tokenizer_vocab} ids but the {what} has vocab_size "
                         f"{model_vocab_size}; text needs a gpt-oss vocabulary (presets gpt-oss-20b, gpt-oss-120b, "
                         "or a config with vocab_size >= 201088)")


__all__ = ["NAMED_SPECIAL_TOKENS", "O200K_BASE_SHA256", "PAT_STR", "Tokenizer", "VOCAB_SIZE", "check_vocab",
           "o200k_harmony", "special_tokens", "vocab_dir"]
