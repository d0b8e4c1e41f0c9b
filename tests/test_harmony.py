"""The Harmony chat format (gptoss.harmony) against the spec's example (§5.2), and the chat session
and `gptoss generate` / `gptoss chat` on a small random model with gpt-oss's vocabulary."""
import io

import pytest
import torch

pytest.importorskip("openai_harmony")
pytest.importorskip("bpe_openai")

from gptoss import ModelConfig, Transformer  # noqa: E402
from gptoss import harmony  # noqa: E402
from gptoss.cli import main  # noqa: E402
from gptoss.tokenizer import Tokenizer  # noqa: E402

# spec §5.2, "Exact example" (HM test-data/test_simple_convo.txt)
SIMPLE_CONVO = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. "
                "Channel must be included for every message.<|end|><|start|>user<|message|>What is 2 + 2?<|end|>"
                "<|start|>assistant")
# tiny-test's features (GQA, windows, YaRN, MoE) with gpt-oss's vocabulary and room for a chat
CFG = ModelConfig.preset("tiny-test", vocab_size=201088, initial_context_length=64)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def model():
    return Transformer.from_config(CFG, seed=21, dtype=torch.float32)


def test_render_matches_spec_example(tok):
    ids = harmony.render_prompt([("user", "What is 2 + 2?")])
    assert tok.decode(ids) == SIMPLE_CONVO
    assert ids == tok.encode(SIMPLE_CONVO, allowed_special="all")


def test_render_options(tok):
    text = tok.decode(harmony.render_prompt([("developer", "Answer in French."), ("user", "Hi")], "low"))
    assert "Reasoning: low" in text and "Reasoning: medium" not in text
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in French.<|end|>" in text
    assert text.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")
    # an earlier turn's analysis is dropped once its final answer is in the history (spec §5.2)
    history = [("user", "2 + 2?"), harmony.message("assistant", "They want a sum.", channel="analysis"),
               harmony.message("assistant", "4", channel="final"), ("user", "And 3 + 3?")]
    text = tok.decode(harmony.render_prompt(history))
    assert "They want a sum." not in text
    assert "<|start|>assistant<|channel|>final<|message|>4<|end|>" in text
    with pytest.raises(ValueError, match="role must be one of"):
        harmony.render_prompt([("robot", "hi")])
    with pytest.raises(ValueError, match="reasoning_effort"):
        harmony.render_prompt([("user", "hi")], "max")
    with pytest.raises(TypeError, match=r"\(role, text\) pair"):
        harmony.render_prompt(["hi"])


def test_parse_reply(tok):
    out = tok.encode("<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>final"
                     "<|message|>2 + 2 = 4.<|return|>", allowed_special="all")
    r = harmony.parse_reply(out)
    assert (r.final, r.analysis, r.complete, r.parsed) == ("2 + 2 = 4.", "Add them.", True, True)
    assert [m.channel for m in r.messages] == ["analysis", "final"]
    cut = harmony.parse_reply(out[:-3])  # max_new_tokens reached inside the final message
    assert not cut.complete
    junk = harmony.parse_reply([tok.message, tok.message, 1000])  # not Harmony: plain text, no error
    assert isinstance(junk.final, str) and not junk.complete


def test_reply_stream(tok):
    out = tok.encode("<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>final"
                     "<|message|>2 + 2 = 4.<|return|>", allowed_special="all")
    got = []
    stream = harmony.ReplyStream(lambda channel, text: got.append((channel, text)))
    for t in out:
        stream(t)
    assert "".join(t for c, t in got if c == "analysis") == "Add them."
    assert "".join(t for c, t in got if c == "final") == "2 + 2 = 4."
    assert len([t for c, t in got if c == "final"]) > 1  # in pieces, as generated
    bad = harmony.ReplyStream(lambda channel, text: got.append((channel, text)))
    for t in [tok.end, tok.end, tok.start, 1000]:  # not the format: no error, nothing reported
        bad(t)


def test_chat_runs_the_model_on_the_rendered_prompt(model, tok):
    chat = harmony.Chat(model, reasoning_effort="low", max_new_tokens=6)
    deltas = []
    reply = chat.send("What is 2 + 2?", on_delta=lambda channel, text: deltas.append((channel, text)))
    if reply.parsed and any(c == "final" for c, _ in deltas):
        assert "".join(t for c, t in deltas if c == "final") == reply.final
    prompt = harmony.render_prompt([("user", "What is 2 + 2?")], "low")
    # the greedy continuation recomputed with full forwards (no KV cache) over prompt + tokens so far
    seq = list(prompt)
    for t in reply.tokens:
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1]
        assert int(logits.argmax()) == t
        seq.append(t)
    assert len(reply.tokens) == 6 or reply.tokens[-1] in tok.assistant_stop_tokens
    assert not reply.complete or reply.tokens[-1] in tok.assistant_stop_tokens
    # the reply's final text joins the history; the next turn's prompt carries it
    second = harmony.render_prompt(chat.history + [harmony.message("user", "And 3 + 3?")])
    text = tok.decode(second)
    assert text.count("<|start|>user<|message|>") == 2 and "<|start|>assistant<|channel|>final<|message|>" in text
    chat.send("And 3 + 3?")
    assert len(chat.history) == 5  # system, user, assistant, user, assistant


def test_chat_rejects_small_vocab_and_long_conversations(model):
    with pytest.raises(ValueError, match="vocab_size 1000"):
        harmony.Chat(Transformer.from_config(ModelConfig.preset("tiny-test"), seed=0, dtype=torch.float32))
    chat = harmony.Chat(model, max_new_tokens=200)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        chat.send("hello")


def test_cli_generate_and_chat(model, tok, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    model.save_checkpoint(str(ckpt))
    common = [str(ckpt), "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "3", "-q"]
    assert main(["generate", *common, "--prompt", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is")
    ids = tok.encode("The capital of France is")
    with torch.no_grad():
        first = int(model(torch.tensor([ids]))[0, -1].argmax())
    if first != tok.endoftext:
        assert out.rstrip("\n").startswith("The capital of France is" + tok.decode([first]))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 2?\n\nHi\n"))  # the blank line is skipped
    assert main(["chat", *common, "--reasoning", "low"]) == 0
    same = harmony.Chat(model, reasoning_effort="low", max_new_tokens=3)
    expect = ""
    for line in ("What is 2 + 2?", "Hi"):
        final = []
        r = same.send(line, on_delta=lambda channel, text: final.append(text) if channel == "final" else None)
        expect += ("".join(final) if final else r.final) + ("" if r.complete else " [max-new-tokens reached]") + "\n"
    assert capsys.readouterr().out == expect
    assert main(["generate", *common, "--prompt", ""]) == 1
    assert "--prompt is empty" in capsys.readouterr().err


WEATHER = harmony.Tool("get_weather", "Current weather in a city.",
                       {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


def test_tools_render_and_tool_calls_parse(tok):
    text = tok.decode(harmony.render_prompt([harmony.developer_message("Be brief.", [WEATHER]),
                                             ("user", "Weather in Paris?")]))
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "# Instructions\n\nBe brief.\n\n# Tools\n\n## functions\n\nnamespace functions {" in text
    assert "// Current weather in a city.\ntype get_weather = (_: {\ncity: string,\n}) => any;" in text
    call = tok.encode('<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather'
                      '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>', allowed_special="all")
    r = harmony.parse_reply(call)
    assert r.tool_call == harmony.ToolCall("get_weather", '{"city": "Paris"}') and r.complete and r.final == ""
    assert harmony.parse_reply(call[:-1]).tool_call is None  # cut off before <|call|>: no call
    # spec §5.2: the result comes back as the tool's message to the assistant on commentary
    assert tok.decode(harmony.encoding().render(harmony.tool_message("get_weather", '{"temp": 20}'))) == (
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>')
    with pytest.raises(ValueError, match="identifier"):
        harmony.Tool("get weather", "x")


def test_chat_tool_call_round_trip(model, tok, monkeypatch):
    """The chat's bookkeeping around a function call, with the model's turns scripted: the call
    stays in the history, the result follows it, the next prompt carries both, and the final
    answer ends the exchange."""
    turns = [
        '<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather'
        '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
        '<|channel|>final<|message|>It is 20 degrees in Paris.<|return|>',
        '<|channel|>final<|message|>You are welcome.<|return|>']
    prompts = []

    def scripted(model, prompts_, max_new_tokens, **kw):
        prompts.append(prompts_[0])
        return [tok.encode(turns[len(prompts) - 1], allowed_special="all")]

    monkeypatch.setattr("gptoss.generate.generate", scripted)
    chat = harmony.Chat(model, tools=[WEATHER], max_new_tokens=64)
    r1 = chat.send("Weather in Paris?")
    assert r1.tool_call == harmony.ToolCall("get_weather", '{"city": "Paris"}')
    with pytest.raises(ValueError, match="not functions.get_time"):
        chat.send_tool_result("get_time", "{}")
    r2 = chat.send_tool_result("get_weather", '{"temp": 20}')
    assert r2.final == "It is 20 degrees in Paris." and r2.tool_call is None
    second = tok.decode(prompts[1])
    assert second.endswith('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
                           '<|message|>{"city": "Paris"}<|call|><|start|>functions.get_weather to=assistant'
                           '<|channel|>commentary<|message|>{"temp": 20}<|end|><|start|>assistant')
    assert "Need the weather." in second  # the analysis stays until a final answer
    chat.send("Thanks")
    third = tok.decode(prompts[2])
    assert "Need the weather." not in third and "It is 20 degrees in Paris.<|end|>" in third
    with pytest.raises(ValueError, match="was not a function call"):
        chat.send_tool_result("get_weather", "{}")


def test_chat_reuses_its_kv_cache_across_turns(model):
    """Each turn prefills only what its prompt adds to the cached tokens; the replies equal those
    of a chat that prefills every prompt from scratch."""
    turns = ["What is 2 + 2?", "And 3 + 3?", "Thanks."]
    fresh = harmony.Chat(model, reasoning_effort="low", max_new_tokens=5, reuse_cache=False)
    reuse = harmony.Chat(model, reasoning_effort="low", max_new_tokens=5)
    for n, text in enumerate(turns):
        a, b = fresh.send(text), reuse.send(text)
        assert a.tokens == b.tokens
        prompt_len = len(harmony.render_prompt(fresh.history[:-1]))  # this turn's prompt
        assert fresh.last_prefill_tokens == prompt_len
        if n == 0:
            assert reuse.last_prefill_tokens == prompt_len
        else:  # the earlier turns stay cached; the new user message and headers are prefilled
            assert 0 < reuse.last_prefill_tokens < prompt_len // 2
