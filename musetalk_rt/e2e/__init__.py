"""The end-to-end latency probe (``musetalk-rt bench e2e``) and its soak mode.

- :mod:`.markers`: speech markers at known samples and the onset detector;
- :mod:`.analysis`: per-marker delays, summaries, windows, GPU-figure substitution, verdict;
- :mod:`.probe`: the run: RTMP server, live process, sender, receiver, report.
"""
