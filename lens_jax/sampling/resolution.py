"""Output sizes: Lens' nine aspect-ratio buckets at base 1024 and 1440, or any multiple of 16."""

from __future__ import annotations

import numbers

PIXELS_PER_TOKEN = 16  # 8x VAE downsampling times the 2x2 patch

# (height, width) per aspect ratio (width:height), as the upstream pipeline defines them.
ASPECT_RATIOS: dict[int, dict[str, tuple[int, int]]] = {
    1024: {
        "1:2": (1472, 736), "9:16": (1376, 768), "2:3": (1248, 832), "3:4": (1152, 864), "1:1": (1024, 1024),
        "4:3": (864, 1152), "3:2": (832, 1248), "16:9": (768, 1376), "2:1": (736, 1472),
    },
    1440: {
        "1:2": (2080, 1040), "9:16": (1936, 1088), "2:3": (1760, 1168), "3:4": (1616, 1216), "1:1": (1440, 1440),
        "4:3": (1216, 1616), "3:2": (1168, 1760), "16:9": (1088, 1936), "2:1": (1040, 2080),
    },
}
DEFAULT_BASE_RESOLUTION = 1024
DEFAULT_ASPECT_RATIO = "1:1"


def resolve_size(
    height: int | None = None,
    width: int | None = None,
    base_resolution: int | None = None,
    aspect_ratio: str | None = None,
) -> tuple[int, int]:
    """Pick (height, width) in pixels: explicit height/width win; otherwise the aspect-ratio bucket."""
    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither (then base_resolution/aspect_ratio choose).")
    if height is not None:
        if aspect_ratio is not None:
            raise ValueError("give either height/width or aspect_ratio, not both.")
        for name, v in (("height", height), ("width", width)):
            # any integer type (numpy's too), not bool or float
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v <= 0 or v % PIXELS_PER_TOKEN:
                nearest = max(PIXELS_PER_TOKEN, round(v / PIXELS_PER_TOKEN) * PIXELS_PER_TOKEN) if isinstance(v, (int, float)) else 1024
                kind = "an integer, a positive multiple" if isinstance(v, (bool, float)) else "a positive multiple"
                raise ValueError(f"{name}={v!r} must be {kind} of {PIXELS_PER_TOKEN}; try {nearest}.")
        return int(height), int(width)
    base = DEFAULT_BASE_RESOLUTION if base_resolution is None else base_resolution
    if base not in ASPECT_RATIOS:
        raise ValueError(f"unknown base_resolution {base!r}; choose one of {sorted(ASPECT_RATIOS)}.")
    ratio = DEFAULT_ASPECT_RATIO if aspect_ratio is None else aspect_ratio
    if ratio not in ASPECT_RATIOS[base]:
        raise ValueError(f"unknown aspect_ratio {ratio!r}; choose one of {list(ASPECT_RATIOS[base])}.")
    return ASPECT_RATIOS[base][ratio]
