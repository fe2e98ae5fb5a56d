"""Imported once, by the decoder processes' forkserver (:data:`mmwatchd.isolate.DECODER_PRELOAD`), never by the
daemon: the work each decoder process would otherwise do at its first file is done before any of them forks.

- Pillow's file-format plugins (``Image.init()``): the first ``Image.open`` in a process imports them, about 12 ms,
  more when the file is of a rarer format.
- simplejpeg and numpy, which the M/8 JPEG decode loads at the first large JPEG: 60-90 ms.

Each decoder process then starts with them loaded, and its pages are shared with the forkserver's. The first file
of a one-shot command is on the path to its first request, so those milliseconds are the user's.
"""

from PIL import Image

from mmwatchd.encode import image

Image.init()
image._simplejpeg()  # None where simplejpeg cannot be imported: the decoders use Pillow's 1/2^k decode then
