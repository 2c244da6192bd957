"""Peer-side training step, interleaved: SmolLM2 fwd+bwd+AdamW on one 896-token row, fp32 / autocast bf16 / bf16 weights."""
import sys, time, statistics, torch
from transformers import AutoModelForCausalLM
folder, threads, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads); torch.manual_seed(0)
ids = torch.randint(0, 49152, (2, 805))
cfgs = {}
for name in ("fp32", "bf16-amp", "bf16"):
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if name == "bf16" else torch.float32, attn_implementation="sdpa").train()
    cfgs[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-5))
def step(name):
    m, opt = cfgs[name]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16-amp"):
        loss = m(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
    return float(loss)
for name in cfgs: step(name)  # warm-up
t = {n: [] for n in cfgs}
for _ in range(reps):
    for n in cfgs:
        s = time.perf_counter(); l = step(n); t[n].append(time.perf_counter() - s)
for n, v in t.items():
    print(f"torch {n:9} threads {threads}: {min(v):6.1f} s/step min, {statistics.median(v):6.1f} median ({['%.1f' % x for x in v]}) {2*805/min(v):.1f} tok/s", flush=True)
