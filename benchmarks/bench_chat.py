"""A multi-turn Harmony chat: seconds per turn with the KV cache kept between turns (gptoss.harmony
Chat, the default) against the same chat prefilling every turn's whole prompt (reuse_cache=False),
side by side on the same model, alternating turn by turn.

The model is gpt-oss-20b's shape cut to --layers layers with random MXFP4 weights: the replies are
noise, the token counts and times are what a real checkpoint's would be for the same lengths. Each
turn is a user message of --user-tokens words plus a reply of --reply-tokens tokens (generation
runs to max_new_tokens: random weights rarely emit a stop token).

    python benchmarks/bench_chat.py [--device cuda] [--turns 6]
"""
import argparse
import time

import torch

from common import commit, machine, print_table, sync


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--user-tokens", type=int, default=40, help="words per user message")
    p.add_argument("--reply-tokens", type=int, default=16)
    a = p.parse_args()
    from gptoss import ModelConfig, Transformer
    from gptoss.harmony import Chat
    cfg = ModelConfig.preset("gpt-oss-20b", num_hidden_layers=a.layers)
    model = Transformer.from_config(cfg, seed=0, mxfp4=True, dtype=torch.bfloat16, device=a.device)
    chats = {"kept cache (default)": Chat(model, reasoning_effort="low", max_new_tokens=a.reply_tokens),
             "whole prompt each turn": Chat(model, reasoning_effort="low", max_new_tokens=a.reply_tokens,
                                            reuse_cache=False)}
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    rows = []
    for turn in range(a.turns):
        text = " ".join(words[(turn + i) % len(words)] for i in range(a.user_tokens))
        for name, chat in chats.items():
            sync(a.device)
            t0 = time.perf_counter()
            reply = chat.send(text)
            sync(a.device)
            rows.append([turn + 1, name, chat.last_prefill_tokens, len(reply.tokens), f"{time.perf_counter() - t0:.2f}"])
    print_table(f"Harmony chat, gpt-oss-20b cut to {a.layers} layers (random MXFP4 weights), {a.device}, "
                f"{torch.get_num_threads()} threads; {machine()}; commit {commit()}",
                ["turn", "chat", "prompt tokens prefilled", "reply tokens", "seconds"], rows)


if __name__ == "__main__":
    main()
