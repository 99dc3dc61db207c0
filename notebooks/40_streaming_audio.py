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
# # 40 · Streaming audio
# The live voice activity over a clip (where it hears speech), and the streaming features
# against offline ones for several look-aheads: what each 40 ms of extra delay buys. The
# error needs a trained whisper encoder: the dev extra's tiny.en stands in for MuseTalk's.

# %% tags=["parameters"] nbmake={"mock": {"clip": "../../shared/fixtures/eng.wav", "max_s": 6.0, "lookaheads_ms": [0, 80], "hop_frames": 25}}
clip = "../../shared/fixtures/eng.wav"
max_s = 30.0
lookaheads_ms = [0, 40, 80, 160, 400]
hop_frames = 1  # frames per whisper canvas (1 as the live default)
device = "cpu"

# %%
from musetalk_rt.workbench import audio, plots

samples = audio.load_clip(clip, max_s)

# %%
timeline = audio.vad_timeline(samples)

# %%
fig = plots.vad_plot(timeline, f"voice activity: {len(timeline['segments'])} segments")
# %%
whisper, fe = audio.trained_whisper(device)

# %%
curve = audio.lookahead_tradeoff(
    whisper, fe, samples, tuple(lookaheads_ms), encoder="whisper tiny.en", hop_frames=hop_frames
)

# %%
fig = plots.tradeoff_plot(curve)
