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
# # 50 · Latency budget
# Voice to screen as a waterfall — look-ahead, batching wait, compute, encode, transport,
# player — against the 5-second budget, from a recorded `musetalk-rt bench e2e` run (rows in
# `experiments/results/*/e2e.jsonl`).

# %% tags=["parameters"] nbmake={"mock": {"results_root": "../experiments/results"}}
results_root = "../experiments/results"
engine = "compile"
gpu = "H200"
run = "20261201T140322Z"  # the event preset's run (configs/event.toml); None: the newest
player_buffer_ms = 100.0

# %%
from musetalk_rt.workbench import budget, plots, results

summary = budget.find_e2e_summary(results.load(results_root, "e2e"), engine, gpu, run)

# %%
parts = budget.waterfall(summary, player_buffer_ms)
print("\n".join(f"{p['part']:<38}{p['ms']:>8.1f} ms  {p['source']}" for p in parts))

# %%
fig = plots.waterfall_plot(parts, title=f"voice to screen, {engine} on {summary['gpu']}")
