# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 20 · Precision and engines
# eager fp32/fp16/bf16, compile, aoti and trt side by side at one batch size: latency,
# frames/s, memory, build time and the quality gate (PSNR of the decoded faces and the latents'
# error against fp32 eager), with each engine's faces next to the reference and their
# difference. An engine that cannot run on this machine is listed with the reason.

# %% tags=["parameters"] nbmake={"mock": {"weights": "tiny", "device": "cpu", "scenarios": ["eager:fp32", "eager:bf16", "trt:fp16"], "batch": 2, "iters": 2, "work": "out/nb20", "results_root": "out/results"}}
weights = "synthetic"
models_dir = "../models"
device = "cuda"
scenarios = ["eager:fp32", "eager:fp16", "eager:bf16", "compile:fp16", "aoti:fp16", "trt:fp16"]
batch = 4
iters = 20
work = "out/nb20"
results_root = "../experiments/results"

# %%
from musetalk_rt.bench import table
from musetalk_rt.weights import load_models
from musetalk_rt.workbench import plots, profile, quality, sweep

models = load_models(weights, models_dir, device)
avatar = profile.probe_avatar(models, work)

# %%
faces = []
rows = sweep.engine_sweep(
    models, scenarios, [batch], results_root, iters=iters,
    on_built=lambda e, d, u, v: faces.append(quality.compare_faces(models, avatar, u, v, f"{e}/{d}", batch)),
)  # fmt: skip

# %%
print(table(sweep.measured(rows)))
print("\n".join(f"{r['scenario']}: skipped: {r['skipped']}" for r in rows if "skipped" in r))

# %%
fig = plots.face_grid(faces)
