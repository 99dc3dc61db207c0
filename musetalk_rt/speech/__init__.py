"""Groq speech services: live captions and voice mode (README, "Groq speech").

- :mod:`.config`: the ``[groq]`` settings and their budget.
- :mod:`.groq_client`: the official ``groq`` client within deadlines, key never logged.
- :mod:`.breaker`: the circuit breaker that stops calling a failing Groq.
- :mod:`.utterances`: VAD-cut utterances of a live stream.
- :mod:`.captions`: cues, SRT/WebVTT files, burned-in subtitles (CJK fonts).
- :mod:`.live`: the captions and voice-mode sinks in front of a live channel.

A stand-in server for tests and demos is :mod:`musetalk_rt.testing.groq_standin`.
"""
