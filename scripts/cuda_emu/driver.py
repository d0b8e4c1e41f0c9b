import os, sys, time, traceback, math
W = "/work/wt-attn-cuda"
sys.path[:0] = [W, f"{W}/tests"]
import torch
import gptoss_ext
torch.ops.load_library(os.environ.get("EMU_BUILD", "/tmp/emu/build") + "/" + os.environ.get("EMU_NAME", "attn_emu") + ".so")
import test_attention_cuda as t
t.DEV = "cpu"
torch.set_num_threads(1)
ops = torch.ops.gptoss_ext

def run(name, fn, *args, **kw):
    torch.manual_seed(sum(map(ord, name + str(args))) % 2**31)
    t0 = time.time()
    try:
        fn(*args, **kw)
        print(f"PASS {name}{args} {time.time()-t0:.1f}s", flush=True)
        return True
    except BaseException as e:
        print(f"FAIL {name}{args}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
        return False

if __name__ == "__main__":
    which = sys.argv[1:]
    exec(open("/tmp/emu/cases.py").read())
