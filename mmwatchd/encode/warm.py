"""Imported once, by the decoder processes' forkserver (:data:`mmwatchd.isolate.DECODER_PRELOAD`), never by the
daemon: the work each decoder process would otherwise do at its first file is done before any of them forks.

That is Pillow's file-format plugins (``Image.init()``): the first ``Image.open`` in a process imports them, about
12 ms, more when the file is of a rarer format. The first file of a one-shot command is on the path to its first
request, so those milliseconds are the user's.

simplejpeg is not loaded here, though its first use costs 60-90 ms: it brings numpy, whose BLAS maps 40-80 MB of
buffers. Forked into every decoder, that counts against ``limits.decode_memory_mb`` (the address space a decoder
may use) before its first file; loaded at the first large JPEG instead, a decoder too small for it falls back to
Pillow's decode.
"""

from PIL import Image

Image.init()
