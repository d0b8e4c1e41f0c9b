"""The Harmony chat format of gpt-oss (spec §5.2) through openai-harmony, offline, and a chat
session that runs our model on it.

openai-harmony renders conversations to o200k_harmony token ids and parses the model's completion
back into messages (channels analysis / commentary / final). It reads o200k_base's ranks from the
folder in TIKTOKEN_ENCODINGS_BASE; when that variable is unset it is pointed at gptoss.tokenizer's
vocabulary folder, so nothing is downloaded.

    from gptoss import Transformer
    from gptoss.harmony import Chat
    chat = Chat(Transformer.from_checkpoint("gpt-oss-20b/original"), reasoning_effort="low")
    print(chat.send("What is 2 + 2?").final)
"""
import dataclasses
import functools
import os
from typing import Callable, List, Literal, Optional, Sequence

from .tokenizer import check_vocab, o200k_harmony, vocab_dir

Effort = Literal["low", "medium", "high"]
ROLES = ("system", "developer", "user", "assistant")


@functools.lru_cache(maxsize=None)
def encoding():
    """openai-harmony's HarmonyEncoding for gpt-oss (o200k_harmony), loaded without network access."""
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(vocab_dir()))
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def system_message(reasoning_effort: Effort = "medium", *, model_identity: Optional[str] = None,
                   knowledge_cutoff: Optional[str] = None, current_date: Optional[str] = None):
    """The system message: Harmony's defaults (spec §5.2) with these fields replaced when given."""
    from openai_harmony import Message, ReasoningEffort, Role, SystemContent
    if reasoning_effort not in ("low", "medium", "high"):
        raise ValueError(f"reasoning_effort must be 'low', 'medium' or 'high', got {reasoning_effort!r}")
    content = SystemContent.new().with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    if model_identity is not None:
        content = content.with_model_identity(model_identity)
    if knowledge_cutoff is not None:
        content = content.with_knowledge_cutoff(knowledge_cutoff)
    if current_date is not None:
        content = content.with_conversation_start_date(current_date)
    return Message.from_role_and_content(Role.SYSTEM, content)


def message(role: str, text: str, channel: Optional[str] = None):
    """A plain text message of `role` (developer text becomes the developer message's instructions)."""
    from openai_harmony import DeveloperContent, Message, Role
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(text, str):
        raise TypeError(f"message text must be a str, got {type(text).__name__}")
    if role == "system":
        raise ValueError("use system_message() for the system message (it carries Harmony's required fields)")
    content = DeveloperContent.new().with_instructions(text) if role == "developer" else text
    msg = Message.from_role_and_content(Role(role), content)
    return msg.with_channel(channel) if channel else msg


def render_prompt(messages: Sequence, reasoning_effort: Effort = "medium") -> List[int]:
    """Token ids of a conversation followed by `<|start|>assistant`: the prompt the model completes.

    `messages` holds (role, text) pairs or openai_harmony Messages; a system message with
    `reasoning_effort` is put first unless the messages start with one. Earlier assistant turns'
    analysis is dropped where Harmony drops it (spec §5.2)."""
    from openai_harmony import Conversation, Message, Role
    msgs = []
    for m in messages:
        if isinstance(m, Message):
            msgs.append(m)
        elif isinstance(m, (tuple, list)) and len(m) == 2:
            msgs.append(message(*m))
        else:
            raise TypeError(f"render_prompt: each message must be a (role, text) pair or an openai_harmony Message, "
                            f"got {m!r}")
    if not msgs or msgs[0].author.role != Role.SYSTEM:
        msgs.insert(0, system_message(reasoning_effort))
    return encoding().render_conversation_for_completion(Conversation.from_messages(msgs), Role.ASSISTANT)


@dataclasses.dataclass
class Reply:
    """One assistant turn: the text of each channel, the parsed messages and the raw tokens."""
    final: str
    analysis: str
    messages: list
    tokens: List[int]
    complete: bool  # ended on a stop token (<|return|> or <|call|>), not on max_new_tokens
    parsed: bool    # the tokens followed the Harmony format (else `final` is their plain decode)


def parse_reply(tokens: Sequence[int]) -> Reply:
    """The assistant's completion tokens (after the prompt's `<|start|>assistant`) as a Reply.
    Tokens that do not follow the format (an untrained model, a cut-off turn) are decoded as plain
    text into `final` with parsed=False rather than raising."""
    from openai_harmony import Role
    enc = encoding()
    toks = [int(t) for t in tokens]
    complete = bool(toks) and toks[-1] in enc.stop_tokens_for_assistant_actions()
    try:
        msgs = enc.parse_messages_from_completion_tokens(toks, Role.ASSISTANT)
    except Exception:  # openai_harmony raises HarmonyError (and others) on malformed streams
        return Reply(final=o200k_harmony().decode(toks, errors="replace"), analysis="", messages=[], tokens=toks,
                     complete=complete, parsed=False)

    def text(channel: Optional[str]) -> str:
        return "".join(c.text for m in msgs if m.channel == channel for c in m.content if hasattr(c, "text"))

    final = text("final")
    if not final and all(m.channel is None for m in msgs):
        final = text(None)
    return Reply(final=final, analysis=text("analysis"), messages=msgs, tokens=toks, complete=complete, parsed=True)


class ReplyStream:
    """Feeds an assistant turn's tokens, one at a time, to openai-harmony's StreamableParser and
    calls on_delta(channel, text) with each piece of message text as it is decoded. A stream that
    stops following the format (an untrained model) is no longer reported; parse_reply still
    decodes the whole turn."""

    def __init__(self, on_delta: Callable[[Optional[str], str], None]):
        from openai_harmony import Role, StreamableParser
        self.on_delta = on_delta
        self.parser = StreamableParser(encoding(), Role.ASSISTANT)

    def __call__(self, token: int) -> None:
        if self.parser is None:
            return
        try:
            self.parser.process(int(token))
        except Exception:  # malformed stream: stop reporting (HarmonyError and others)
            self.parser = None
            return
        delta = self.parser.last_content_delta
        if delta:
            self.on_delta(self.parser.current_channel, delta)


class Chat:
    """A multi-turn chat with a gpt-oss model: each send() renders the history in Harmony, generates
    the assistant's turn over the KV cache until <|return|> or <|call|>, and keeps the reply's final
    message in the history (its analysis is not sent back, as Harmony prescribes)."""

    def __init__(self, model, *, reasoning_effort: Effort = "medium", developer: Optional[str] = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, seed: Optional[int] = None,
                 cuda_graph: Optional[bool] = None):
        check_vocab(model.cfg.vocab_size)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.cuda_graph = cuda_graph
        self.history = [system_message(reasoning_effort)]
        if developer:
            self.history.append(message("developer", developer))

    def send(self, text: str, on_delta: Optional[Callable[[Optional[str], str], None]] = None) -> Reply:
        """One user turn -> the assistant's reply. on_delta(channel, text), if given, receives the
        reply's message text while it is generated (channel "analysis", "final", ...)."""
        from .generate import generate
        self.history.append(message("user", text))
        prompt = render_prompt(self.history)
        cfg = self.model.cfg
        limit = cfg.initial_context_length * max(1.0, cfg.rope_scaling_factor)
        if len(prompt) + self.max_new_tokens > limit:
            raise ValueError(f"Chat.send: the conversation ({len(prompt)} tokens) plus max_new_tokens "
                             f"({self.max_new_tokens}) exceeds the model's context ({int(limit)})")
        out = generate(self.model, [prompt], self.max_new_tokens, temperature=self.temperature,
                       stop_tokens=encoding().stop_tokens_for_assistant_actions(), seed=self.seed,
                       cuda_graph=self.cuda_graph,
                       on_token=None if on_delta is None else _per_sequence(ReplyStream(on_delta)))[0]
        reply = parse_reply(out)
        self.history.append(message("assistant", reply.final, channel="final"))
        return reply


def _per_sequence(feed: Callable[[int], None]) -> Callable[[int, int], None]:
    return lambda i, token: feed(token)


__all__ = ["Chat", "ReplyStream", "Reply", "encoding", "message", "parse_reply", "render_prompt", "system_message"]
