"""The model on CUDA: decode steps replayed from a CUDA graph (gptoss.CUDAGraphDecoder) against the
eager decode step and the full forward, over a ragged batch whose sliding-window rings wrap around;
the torch.compile'd decode step on CUDA. Skipped without a GPU and a CUDA build."""
import pytest
import torch

from conftest import requires_cuda
from gptoss import CUDAGraphDecoder, ModelConfig, Transformer
from gptoss.generate import generate

pytestmark = [requires_cuda, pytest.mark.cuda]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (preset, dtype, MXFP4 experts, tolerance of graph vs eager). notebook-demo in bf16 takes the
# tensor-core attention (head_dim 64) and the MXFP4 GEMV decode kernel; tiny-test in fp32 the SIMT
# kernels. The graph replays the eager step's kernels: anything beyond rounding noise is a bug.
CASES = [("tiny-test", torch.float32, False, 1e-6), ("notebook-demo", torch.bfloat16, True, 1e-3)]


def _ragged(cfg, lens, extra):
    seqs = [torch.randint(0, cfg.vocab_size, (n + extra,)) for n in lens]
    padded = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        padded[i, :n] = seqs[i][:n]
    return seqs, padded.cuda()


@pytest.mark.parametrize("preset,dtype,mxfp4,tol", CASES)
@pytest.mark.parametrize("per_step", [1, 2])
def test_cuda_graph_decode_matches_eager(preset, dtype, mxfp4, tol, per_step):
    cfg = ModelConfig.preset(preset)
    model = Transformer.from_config(cfg, seed=11, mxfp4=mxfp4, dtype=dtype, device="cuda")
    window = cfg.sliding_window
    # Ring of round_up(window + max_step - 1, 64) slots; sequence 0 decodes past it (wrap-around).
    max_step = 40
    slots = -(-(window + max_step - 1) // 64) * 64
    lens = [max_step, 23]
    steps = (slots - lens[0]) // per_step + 6
    max_len = lens[0] + steps * per_step + 1
    seqs, padded = _ragged(cfg, lens, steps * per_step)
    with torch.no_grad():
        eager_caches = model.new_caches(2, max_len, max_step=max_step)
        graph_caches = model.new_caches(2, max_len, max_step=max_step)
        assert eager_caches[0].ring and eager_caches[0].slots == slots
        for caches in (eager_caches, graph_caches):
            model(padded, caches, advance=lens)
        decoder = CUDAGraphDecoder(model, graph_caches, tokens_per_step=per_step)
        assert graph_caches[0].host_lengths == lens and graph_caches[0].lengths.tolist() == lens  # capture undone
        outs = []
        for s in range(steps):
            tok = torch.stack([seqs[i][n + s * per_step: n + (s + 1) * per_step]
                               for i, n in enumerate(lens)]).cuda()
            eager = model.decode_step(tok, eager_caches)
            graph = decoder(tok)
            assert rel_err(graph, eager) <= tol, f"step {s}"
            outs.append(graph.clone())
        assert graph_caches[0].lengths.tolist() == graph_caches[0].host_lengths == [n + steps * per_step
                                                                                    for n in lens]
        if dtype == torch.float32:  # the incremental result equals each sequence's full forward
            got = torch.cat(outs, 1)
            for i, n in enumerate(lens):
                alone = model(seqs[i][None, : n + steps * per_step].cuda())[0, n:]
                assert rel_err(got[i], alone) < 1e-5


def test_cuda_graph_decoder_checks_room_and_shape():
    cfg = ModelConfig.preset("tiny-test")
    model = Transformer.from_config(cfg, seed=12, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        caches = model.new_caches(1, 6)
        model(torch.randint(0, cfg.vocab_size, (1, 4), device="cuda"), caches)
        decoder = CUDAGraphDecoder(model, caches)
        with pytest.raises(ValueError, match="captured shape"):
            decoder(torch.zeros(1, 2, dtype=torch.long, device="cuda"))
        for _ in range(2):
            decoder(torch.randint(0, cfg.vocab_size, (1, 1), device="cuda"))
        with pytest.raises(ValueError, match="cache overflow"):
            decoder(torch.randint(0, cfg.vocab_size, (1, 1), device="cuda"))
        assert caches[0].lengths.tolist() == caches[0].host_lengths == [6]


def test_generate_cuda_graph_equals_eager():
    cfg = ModelConfig.preset("tiny-test")
    model = Transformer.from_config(cfg, seed=13, dtype=torch.float32, device="cuda")
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (9, 4, 1)]
    eager = generate(model, prompts, 12, cuda_graph=False)
    assert generate(model, prompts, 12, cuda_graph=True) == eager
    assert generate(model, prompts, 12) == eager  # the default takes the graph on CUDA


def test_compiled_decode_step_on_cuda_compiles_once():
    pytest.importorskip("triton")
    from torch._dynamo.utils import counters
    cfg = ModelConfig.preset("notebook-demo")
    model = Transformer.from_config(cfg, seed=14, mxfp4=True, dtype=torch.bfloat16, device="cuda")
    lens, steps = [12, 5], 8
    seqs, padded = _ragged(cfg, lens, steps)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        eager_caches, compiled_caches = (model.new_caches(2, 64, max_step=12) for _ in range(2))
        for caches in (eager_caches, compiled_caches):
            model(padded, caches, advance=lens)
        step = model.compile_decode()
        for s in range(steps):
            tok = torch.stack([seqs[i][n + s] for i, n in enumerate(lens)])[:, None].cuda()
            assert rel_err(step(tok, compiled_caches), model.decode_step(tok, eager_caches)) < 2e-2, f"step {s}"
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled_caches[0].lengths.tolist() == compiled_caches[0].host_lengths == [n + steps for n in lens]
