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
# # 60 · Live dry run
# The live pipeline in this process: channels recording to MP4, the same WAV sent to each in
# real time, `/metrics` read every second. The controls at the end run it again with another
# engine, batch size or channel count.

# %% tags=["parameters"] nbmake={"mock": {"weights": "tiny", "device": "cpu", "engine": "eager", "dtype": "fp32", "batch_size": 4, "channels": 1, "duration_s": 8.0, "extra_args": ["--stream-hop", "25", "--delay-ms", "3000"], "work": "out/nb60"}}
weights = "synthetic"
models_dir = "../models"
device = "cuda"
engine = "compile"
dtype = "fp16"
batch_size = 4
channels = 2
duration_s = 30.0
wav = "../../shared/fixtures/eng.wav"
extra_args = []
work = "out/nb60"

# %%
from musetalk_rt.weights import load_models
from musetalk_rt.workbench import dry_run, plots, profile

avatar = profile.probe_avatar(load_models(weights, models_dir, "cpu"), work)

# %%
run = dry_run.dry_run(
    avatar.avatar_id,
    f"{work}/avatars",
    wav,
    weights,
    device,
    engine,
    dtype,
    batch_size,
    channels,
    duration_s,
    work,
    tuple(extra_args),
)

# %%
print(run.summary())
fig = plots.metrics_plot(run)
# %%
fig = plots.frames_strip(run, "c0")


# %%
def again(**choice):
    return dry_run.dry_run(
        avatar.avatar_id,
        f"{work}/avatars",
        wav,
        weights,
        device,
        dtype=dtype,
        duration_s=duration_s,
        work=work,
        extra_args=tuple(extra_args),
        **choice,
    ).summary()


dry_run.controls(again, engine, batch_size, channels)
