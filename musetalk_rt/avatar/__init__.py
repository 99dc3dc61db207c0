"""Avatar materials: prepared once per source video/image, loaded by render and live."""

from musetalk_rt.avatar.geometry import Box, parse_bbox
from musetalk_rt.avatar.prepare import prepare_avatar
from musetalk_rt.avatar.store import Avatar, cycle_index, load_avatar

__all__ = ["Avatar", "Box", "cycle_index", "load_avatar", "parse_bbox", "prepare_avatar"]
