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
# # 10 · Stage profile
# Per-stage time of one batch — features (whisper canvases), UNet, VAE decode, to_host, blend,
# encode — for each batch size, as a stacked bar, and a torch profiler trace of the heaviest
# model stage (open it in Perfetto or chrome://tracing). Rows go to `results_root`.

# %% tags=["parameters"] nbmake={"mock": {"weights": "tiny", "device": "cpu", "engine": "eager", "dtype": "fp32", "batch_sizes": [1, 2], "iters": 2, "work": "out/nb10", "results_root": "out/results"}}
weights = "synthetic"  # real | synthetic | tiny
models_dir = "../models"
device = "cuda"
engine = "eager"
dtype = "fp16"
batch_sizes = [1, 4, 16, 32]
iters = 20
hop_frames = 1
work = "out/nb10"
results_root = "../experiments/results"

# %%
from musetalk_rt.weights import load_models
from musetalk_rt.workbench import plots, profile, results

models = load_models(weights, models_dir, device)

# %%
avatar = profile.probe_avatar(models, work)

# %%
gen = profile.make_generator(models, engine, dtype, batch_sizes)

# %%
rows = profile.stage_profile(gen, avatar, iters=iters, hop_frames=hop_frames)

# %%
results.save(rows, results_root, device, "stage_profile")

# %%
fig = plots.stage_bars(rows, f"{engine}/{dtype} on {rows[0]['gpu']}")
# %%
profile.profile_trace(gen, profile.heaviest_stage(rows[-1]), f"{work}/trace.json")
