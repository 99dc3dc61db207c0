"""``python -m musetalk_rt.live``."""

from musetalk_rt.live.app import main

raise SystemExit(main())
