"""musetalk_rt: make a MuseTalk v1.5 avatar speak, offline and (later) live.

The package keeps one reference path (fp32 eager, MuseTalk's maths in ``modeling/``) and turns it
into fast engines (``engines/``) that are always checked against it.
"""

__version__ = "0.1.0"
