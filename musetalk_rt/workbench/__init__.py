"""The tuning workbench behind the notebooks in ``notebooks/``.

Every notebook cell calls one function from here, so the logic is tested like the rest of the
package and the notebooks stay thin: ``env`` (what is installed and what is missing),
``profile`` (per-stage time and a profiler trace), ``quality`` (an engine's frames beside the
fp32 reference), ``sweep`` (engines x dtypes x batch sizes as bench rows, the recommended
buckets), ``audio`` (streaming features against offline, the look-ahead trade-off), ``budget``
(the voice-to-screen waterfall from recorded rows), ``dry_run`` (the live process with a WAV
sender, its frames and metrics), ``results`` (reading and writing rows) and ``plots``
(matplotlib figures from rows; ``experiments/figures.py`` draws the same ones).
"""
