"""python bench/bench_step_ab.py  (C=500 by default)

A/B in one process: step with text bridge features pooled for all classes vs the labels only, and
attention by the table vs torch's choice. 500 classes, drop / bf16 / cached."""
import os, sys, time, copy, torch
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import open_clip
from classnames import classnames
from drople_fast.clip import attention_dispatch as dispatch
from drople_fast.clip.config import IWTDConfig
from drople_fast.training.learner import DroPLe
from drople_fast.training.precision import autocast
C = int(os.environ.get("C", 500))
torch.manual_seed(0)
learner = DroPLe(open_clip.create_model("ViT-B-16", pretrained=None), classnames(C), iwtd=IWTDConfig(mode="drop")).train()
g = torch.Generator().manual_seed(0)
images = torch.randn(4, 3, 224, 224, generator=g); labels = torch.randint(0, C, (4,), generator=g)
opt = torch.optim.AdamW([p for _, p in learner.trainable_named_parameters()], lr=1e-6)
t0 = time.time(); learner.teacher_text_features(); print(f"teacher text features (setup): {time.time()-t0:.1f} s", flush=True)
cached = learner.teacher_image_features(images)
committed = dispatch.table()
dev = torch.device("cpu")
def step():
    opt.zero_grad(set_to_none=True)
    with autocast("bf16", dev):
        _, terms = learner(images, labels, epoch=1, total_epochs=20, teacher_features=cached)
    terms["total"].backward(); opt.step()
cases = [("labels", "table"), ("all", "table"), ("labels", "sdpa"), ("all", "sdpa")]
best = {c: float("inf") for c in cases}
for r in range(3):
    for rows, tab in cases:
        learner.text_bridge_rows = rows
        dispatch.set_table(committed if tab == "table" else {})
        t0 = time.perf_counter(); step(); t = time.perf_counter() - t0
        if r: best[(rows, tab)] = min(best[(rows, tab)], t)
print(f"| text bridge rows | attention | step s (fastest of 2) | vs all + torch's SDPA |\n|---|---|---:|---:|")
for c in cases:
    print(f"| {c[0]} | {'measured table' if c[1]=='table' else 'torch SDPA choice'} | {best[c]:.2f} | {best[('all','sdpa')]/best[c]:.2f}x |")
print("load", os.getloadavg())
