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
# # 00 · Environment
# What this machine has for musetalk_rt — GPU, versions, weights, engine cache — what is
# missing, and the command that fixes each. Run it first on a new GPU host.

# %% tags=["parameters"] nbmake={"mock": {"models_dir": "../models"}}
models_dir = "../models"

# %%
from musetalk_rt.workbench import env, plots

checks = env.environment_checks(models_dir)

# %%
print(env.format_checks(checks))

# %%
fig = plots.status_plot(checks)
