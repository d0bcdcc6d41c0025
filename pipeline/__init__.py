"""crosstvr stage one: dataset adapters, ffmpeg decoding, the frozen open_clip encoder and the Zarr cache."""

__version__ = "0.1.0"
