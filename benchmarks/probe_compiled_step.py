"""Probe for issue 5: does compiling the model forward inside the static CUDA-graph step close the gap to the AR
step? Random-weight Qwen3 shapes, batch 1, prompt 256, 256 new tokens, 4 tokens per step.

    python benchmarks/probe_compiled_step.py 0.6b 8b

Superseded by `generate(compile=True)` (compiled decoder layers inside the kept CUDA graphs; `bench.py` measures it):
kept as the record of the first measurement.
"""
import sys, time, torch
sys.path.insert(0, ".")
from transformers import Qwen3Config, Qwen3ForCausalLM
from efficient_dlm.conversion import dlm_from_ar_model

def shape(name):
    if name == "8b":
        return dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, tie_word_embeddings=False)
    return dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, tie_word_embeddings=True)

for name in sys.argv[1:]:
    cfg = Qwen3Config(vocab_size=151936, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}, eos_token_id=151645, pad_token_id=151643, **shape(name))
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        parent = Qwen3ForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    dlm = dlm_from_ar_model(parent, block_size=32, shift_logits=False, mask_token_id=151662)
    del parent
    ids = torch.randint(0, 151000, (1, 256), device="cuda")
    kw = dict(max_new_tokens=256, steps=4, eos_token_id=[], cache_implementation="static", return_dict_in_generate=True)
    def timed(label):
        dlm.generate(ids, **kw); torch.cuda.synchronize()
        t = time.perf_counter(); out = dlm.generate(ids, **kw); torch.cuda.synchronize(); s = time.perf_counter() - t
        print(f"{name} {label}: {s*1e3:.1f} ms total, NFE {out.nfe}, {s/out.nfe*1e3:.2f} ms/step incl. capture+prefill, {256/s:.1f} tok/s", flush=True)
        return out.sequences
    a = timed("eager kernels in graph")
    eager_forward = dlm.forward
    dlm.forward = torch.compile(eager_forward, dynamic=False, fullgraph=False)
    t = time.perf_counter()
    try:
        b = timed("compiled forward in graph")
        print(f"{name} same tokens: {torch.equal(a, b)}; compile+runs took {time.perf_counter()-t:.0f}s", flush=True)
    except Exception as e:
        print(f"{name} compile failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    dlm.forward = eager_forward
    del dlm; torch.cuda.empty_cache()
