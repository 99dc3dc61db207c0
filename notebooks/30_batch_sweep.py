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
# # 30 · Batch sweep
# Throughput and per-batch latency against batch size for each engine, with the
# 25 fps × channels lines, and the bucket set recommended for `channels` live channels.

# %% tags=["parameters"] nbmake={"mock": {"weights": "tiny", "device": "cpu", "scenarios": ["eager:fp32"], "batch_sizes": [1, 2, 4], "iters": 2, "channels": 2, "results_root": "out/results"}}
weights = "synthetic"
models_dir = "../models"
device = "cuda"
scenarios = ["eager:fp16", "compile:fp16"]
batch_sizes = [1, 4, 8, 16, 32]
iters = 20
channels = 8
results_root = "../experiments/results"

# %%
from musetalk_rt.weights import load_models
from musetalk_rt.workbench import plots, sweep

models = load_models(weights, models_dir, device)

# %%
rows = sweep.engine_sweep(models, scenarios, batch_sizes, results_root, iters=iters)

# %%
fig = plots.fps_vs_batch(rows, channels=(1, 4, 8, 16))
# %%
fig = plots.latency_vs_batch(rows)
# %%
for engine, dtype in sweep.parse_scenarios(scenarios):
    mine = [r for r in rows if r.get("engine") == engine and r.get("dtype") == dtype]
    print(
        f"{engine}/{dtype}:", sweep.describe_recommendation(sweep.recommend_buckets(mine, channels))
    )
