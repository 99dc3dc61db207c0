"""``python -m musetalk_rt`` is the same as ``musetalk-rt``."""

from musetalk_rt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
