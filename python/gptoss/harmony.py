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
    from openai_harmony import Message, Role
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(text, str):
        raise TypeError(f"message text must be a str, got {type(text).__name__}")
    if role == "system":
        raise ValueError("use system_message() for the system message (it carries Harmony's required fields)")
    msg = developer_message(text) if role == "developer" else Message.from_role_and_content(Role(role), text)
    return msg.with_channel(channel) if channel else msg


@dataclasses.dataclass(frozen=True)
class Tool:
    """A function the assistant may call: its name, what it does, and its parameters as a JSON
    schema (rendered into the developer message as Harmony's TypeScript-like `functions` namespace)."""
    name: str
    description: str
    parameters: Optional[dict] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Tool.name must be an identifier, got {self.name!r}")


def developer_message(instructions: Optional[str] = None, tools: Sequence[Tool] = ()):
    """The developer message: instructions and function tools."""
    from openai_harmony import DeveloperContent, Message, Role, ToolDescription
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools([ToolDescription.new(t.name, t.description, parameters=t.parameters)
                                               for t in tools])
    return Message.from_role_and_content(Role.DEVELOPER, content)


def tool_message(name: str, output: str):
    """A function's result, addressed back to the assistant (spec §5.2: `<|start|>functions.NAME
    to=assistant<|channel|>commentary<|message|>...<|end|>`)."""
    from openai_harmony import Author, Message, Role
    if not isinstance(output, str):
        raise TypeError(f"tool output must be a str (e.g. JSON text), got {type(output).__name__}")
    return (Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), output)
            .with_recipient("assistant").with_channel("commentary"))


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
class ToolCall:
    name: str       # the function, without the `functions.` namespace
    arguments: str  # as the model wrote them (JSON text when it follows the schema)


@dataclasses.dataclass
class Reply:
    """One assistant turn: the text of each channel, the parsed messages and the raw tokens."""
    final: str
    analysis: str
    messages: list
    tokens: List[int]
    complete: bool  # ended on a stop token (<|return|> or <|call|>), not on max_new_tokens
    parsed: bool    # the tokens followed the Harmony format (else `final` is their plain decode)
    tool_call: Optional[ToolCall] = None  # the turn ended on <|call|> to functions.NAME


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
    call = None
    if complete and toks[-1] == CALL and msgs and (msgs[-1].recipient or "").startswith("functions."):
        call = ToolCall(msgs[-1].recipient[len("functions."):],
                        "".join(c.text for c in msgs[-1].content if hasattr(c, "text")))
    return Reply(final=final, analysis=text("analysis"), messages=msgs, tokens=toks, complete=complete, parsed=True,
                 tool_call=call)


CALL = 200012  # <|call|> (spec §5.1)
CHANNELS = ("analysis", "commentary", "final")


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
    the assistant's turn over the KV cache until <|return|> or <|call|>, and keeps the reply's
    messages in the history (Harmony's renderer drops the analysis of turns that reached a final
    answer). With `tools`, a reply may be a function call (Reply.tool_call); answer it with
    send_tool_result(name, output), which generates the assistant's next message."""

    def __init__(self, model, *, reasoning_effort: Effort = "medium", developer: Optional[str] = None,
                 tools: Sequence[Tool] = (), max_new_tokens: int = 512, temperature: float = 0.0,
                 seed: Optional[int] = None, cuda_graph: Optional[bool] = None, reuse_cache: bool = True):
        check_vocab(model.cfg.vocab_size)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.cuda_graph = cuda_graph
        # The KV cache is kept between turns (reuse_cache): a turn prefills only what its prompt
        # adds to the tokens cached so far (after rewinding to their common prefix).
        self.reuse_cache = reuse_cache
        self._caches = None
        self._cached: List[int] = []
        self.last_prefill_tokens = 0  # prompt tokens the last turn had to prefill
        self.history = [system_message(reasoning_effort)]
        if developer or tools:
            self.history.append(developer_message(developer, tools))

    def send(self, text: str, on_delta: Optional[Callable[[Optional[str], str], None]] = None) -> Reply:
        """One user turn -> the assistant's reply. on_delta(channel, text), if given, receives the
        reply's message text while it is generated (channel "analysis", "final", ...)."""
        self.history.append(message("user", text))
        return self._respond(on_delta)

    def send_tool_result(self, name: str, output: str,
                         on_delta: Optional[Callable[[Optional[str], str], None]] = None) -> Reply:
        """The result of the function the last reply called -> the assistant's next reply."""
        last = self.history[-1]
        if not (last.recipient or "").startswith("functions."):
            raise ValueError("send_tool_result: the last reply was not a function call")
        if last.recipient != f"functions.{name}":
            raise ValueError(f"send_tool_result: the last reply called {last.recipient}, not functions.{name}")
        self.history.append(tool_message(name, output))
        return self._respond(on_delta)

    def _caches_for(self, prompt: List[int], context: int):
        """The caches for this turn: the last turn's, rewound to the prefix it shares with `prompt`,
        when they can take the rest; else new ones with room to grow."""
        c = self._caches
        if c is not None:
            p = 0
            for a, b in zip(self._cached, prompt):
                if a != b:
                    break
                p += 1
            p = min(p, len(prompt) - 1)  # at least one token is prefilled (its logits start the reply)
            held = c[0].host_lengths[0]
            if (p > 0 and len(prompt) + self.max_new_tokens <= c[0].max_len and len(prompt) - p <= c[0].max_step
                    and all(held - p <= x.max_rewind() for x in c)):
                for x in c:
                    x.rewind(p)
                return c
        # room for this turn and as much again; a step as long as the prompt, or a long reply
        max_len = min(context, max(2 * (len(prompt) + self.max_new_tokens), 1024))
        return self.model.new_caches(1, max_len, max_step=max(len(prompt), self.max_new_tokens, 256))

    def _respond(self, on_delta) -> Reply:
        from .generate import generate
        prompt = render_prompt(self.history)
        cfg = self.model.cfg
        limit = cfg.initial_context_length * max(1.0, cfg.rope_scaling_factor)
        if len(prompt) + self.max_new_tokens > limit:
            raise ValueError(f"Chat.send: the conversation ({len(prompt)} tokens) plus max_new_tokens "
                             f"({self.max_new_tokens}) exceeds the model's context ({int(limit)})")
        caches = self._caches_for(prompt, int(limit))
        self._caches = None  # until this turn completes: an interrupted one leaves nothing to reuse
        self.last_prefill_tokens = len(prompt) - caches[0].host_lengths[0]
        out = generate(self.model, [prompt], self.max_new_tokens, temperature=self.temperature,
                       stop_tokens=encoding().stop_tokens_for_assistant_actions(), seed=self.seed,
                       cuda_graph=self.cuda_graph, caches=caches,
                       on_token=None if on_delta is None else _per_sequence(ReplyStream(on_delta)))[0]
        if self.reuse_cache:
            self._caches, self._cached = caches, (prompt + out)[: caches[0].host_lengths[0]]
        reply = parse_reply(out)
        if reply.parsed and reply.complete and reply.messages and all(m.channel in CHANNELS for m in reply.messages):
            self.history.extend(reply.messages)  # a well-formed turn, kept as the model wrote it
        else:  # cut off or not in the format: its text, as a final answer
            self.history.append(message("assistant", reply.final, channel="final"))
        return reply


def _per_sequence(feed: Callable[[int], None]) -> Callable[[int, int], None]:
    return lambda i, token: feed(token)


__all__ = ["Chat", "Reply", "ReplyStream", "Tool", "ToolCall", "developer_message", "encoding", "message",
           "parse_reply", "render_prompt", "system_message", "tool_message"]
