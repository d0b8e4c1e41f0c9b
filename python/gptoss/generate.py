"""Text generation over the KV cache: a batch of prompts of different lengths is prefilled in one
call, then decoded one token per step (each step costs one token's work per sequence)."""
import functools
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from gptoss_ext import KVCache

from .cuda_graph import CUDAGraphDecoder
from .model import Transformer


GRAPH_MIN_TOKENS = 16  # cuda_graph=None: the graph for this many new tokens or more


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, stop_tokens: Iterable[int] = (), seed: Optional[int] = None,
             max_len: Optional[int] = None, compile: Union[bool, Dict[str, Any]] = False,
             cuda_graph: Optional[bool] = None, caches: Optional[List[KVCache]] = None,
             on_token: Optional[Callable[[int, int], None]] = None) -> List[List[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature) with
    a generator seeded by `seed`. A sequence stops after emitting a token in `stop_tokens` (the
    stop token is included). Returns the new tokens of each prompt. on_token(i, token), if given,
    is called for each new token of prompt i as soon as it is known (streaming).

    caches (from model.new_caches, one sequence per prompt): continue in these instead of new ones.
    Sequence i's cache must already hold the first caches[0].host_lengths[i] tokens of prompt i
    (earlier turns of a conversation: KVCache.rewind takes back what should not be kept); only the
    rest is prefilled, in one step, so on sliding-window rings it must fit the caches' max_step.
    Afterwards they hold each prompt and its new tokens but the last (which was never fed back).

    The decode steps run eagerly, compiled (compile=True, or a dict of torch.compile arguments:
    Transformer.compile_decode) or replayed from a CUDA graph (cuda_graph=True, CUDA models:
    gptoss.CUDAGraphDecoder). cuda_graph=None (the default) takes the graph for a CUDA model asked
    for at least GRAPH_MIN_TOKENS tokens without compile: an eager decode step is bound by the
    host's ~300 launches per token (gpt-oss-20b on an H100: 115-230 tok/s eager, ~335 with the
    graph, docs/performance.md); below that many tokens the capture is not worth its time.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if compile and cuda_graph:
        raise ValueError("generate: choose one of compile and cuda_graph")
    device = model.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not compile and max_new_tokens >= GRAPH_MIN_TOKENS
    if caches is None:
        start = [0] * len(prompts)
        max_len = max_len or max(len(p) for p in prompts) + max_new_tokens
        caches = model.new_caches(len(prompts), max_len, max_step=max(len(p) for p in prompts))  # one step
    else:
        if len(caches[0].host_lengths) != len(prompts):
            raise ValueError(f"generate: the caches hold {len(caches[0].host_lengths)} sequences for "
                             f"{len(prompts)} prompts")
        start = list(caches[0].host_lengths)
        if any(s >= len(p) for s, p in zip(start, prompts)):
            raise ValueError(f"generate: each prompt must extend what its cache holds ({start} tokens) by at least "
                             "one token")
    rest = [list(p)[s:] for p, s in zip(prompts, start)]  # what the caches do not hold yet
    lens = [len(r) for r in rest]
    padded = torch.zeros(len(prompts), max(lens), dtype=torch.long)
    for i, r in enumerate(rest):
        padded[i, : len(r)] = torch.as_tensor(r)
    last = model(padded.to(device), caches, advance=lens, last_only=True)
    if cuda_graph and max_new_tokens > 1:
        step = CUDAGraphDecoder(model, caches)  # tokens [B, 1] -> logits [B, 1, vocab]
    else:
        decode = model.compile_decode(**(compile if isinstance(compile, dict) else {})) if compile else \
            model.decode_step
        step = functools.partial(decode, caches=caches)
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    stop = set(int(t) for t in stop_tokens)
    out: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for n in range(max_new_tokens):
        if temperature == 0:
            nxt = last.argmax(-1)
        else:
            probs = torch.softmax(last.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in stop
                if on_token is not None:
                    on_token(i, t)
        if all(done) or n == max_new_tokens - 1:  # the last token is not fed back: nothing would use it
            break
        last = step(nxt[:, None])[:, 0]
    return out
