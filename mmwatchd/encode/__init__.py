"""Encoders: media file + spec in, size-bounded :class:`~mmwatchd.model.Part` values out.

Only this package imports Pillow and PyAV. Data-URL arithmetic (``data_url_len``, ``b64_len``, ``Part.url_len``)
lives in :mod:`mmwatchd.model`.
"""

from mmwatchd.encode.image import encode_image, probe_and_encode_image, probe_image
from mmwatchd.encode.video import encode_video, probe_video

__all__ = ["encode_image", "encode_video", "probe_and_encode_image", "probe_image", "probe_video"]
