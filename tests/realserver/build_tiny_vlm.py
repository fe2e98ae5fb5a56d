"""A tiny, randomly initialised LLaVA-NeXT checkpoint that ``transformers serve`` can load, built entirely offline.

    python tests/realserver/build_tiny_vlm.py DEST

writes into DEST (which must not exist yet) a model folder: config, safetensors weights, generation config, a
byte-level BPE tokenizer without merges (every UTF-8 byte is one token), the LLaVA-NeXT image processor and a chat
template. Nothing is downloaded, and nothing beyond ``transformers`` and ``torch`` is needed (no torchvision).
The weights come from a fixed seed, so two builds are identical.

What a test can rely on (importing this module needs neither torch nor transformers):

- :func:`image_tokens` gives the number of ``<image>`` tokens the processor puts into the prompt for an image of a
  given size. LLaVA-NeXT's "anyres" tiling makes that number depend on the decoded image's width *and* height;
- the chat template renders an image part as ``<image>`` and text as is, so a request with one image has exactly
  ``image_tokens(w, h)`` more prompt tokens than the same request without it;
- the generation config greedily picks among the letters a-z only (end-of-text and everything else is
  suppressed), so every reply is ``max_tokens`` letters and ends with ``finish_reason: length``.
"""

from __future__ import annotations

import sys
from pathlib import Path

SEED = 1234
TILE = 56  # the vision tower's input side: every tile and the overview image are TILE x TILE
PATCH = 14  # so a tile is (TILE // PATCH) ** 2 = 16 patches
GRID_PINPOINTS = [[TILE * r, TILE * c] for r in (1, 2, 3) for c in (1, 2, 3)]  # (height, width): 1x1 .. 3x3 tiles

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
VOCAB_SIZE = 272  # 256 byte tokens + the special tokens, padded to a multiple of 16

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- what the processor does with an image of a given size (LLaVA-NeXT "anyres"), restated -------------------------


def best_resolution(height: int, width: int) -> tuple[int, int]:
    """The grid pinpoint an image is resized into: the most of its pixels kept, then the least padding."""
    best, best_effective, best_wasted = (0, 0), -1, None
    for pin_h, pin_w in GRID_PINPOINTS:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_h * pin_w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_h, pin_w), effective, wasted
    return best


def image_tokens(width: int, height: int) -> int:
    """How many ``<image>`` tokens stand for one ``width`` x ``height`` image in the prompt.

    The overview tile's patches (the CLS feature is dropped), plus the tiled image's patch grid with the rows and
    columns that are only padding removed, plus one row-end token per remaining row.
    """
    side = TILE // PATCH
    pin_h, pin_w = best_resolution(height, width)
    rows, cols = side * (pin_h // TILE), side * (pin_w // TILE)
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        rows -= (rows - kept) // 2 * 2
    else:
        kept = int(round(width * (rows / height), 7))
        cols -= (cols - kept) // 2 * 2
    return side * side + rows * cols + rows


# -- the build -----------------------------------------------------------------------------------------------------


def _byte_level_vocab() -> dict[str, int]:
    """GPT-2's byte-to-character table, numbered so that a byte token's id is the byte's value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return {chars[byte]: byte for byte in range(256)}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=_byte_level_vocab(), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=8192,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    if ids != list(range(256, 256 + len(SPECIAL_TOKENS))):
        raise RuntimeError(f"unexpected special token ids {ids}")
    return tokenizer


def build(dest: Path) -> Path:
    import torch
    from transformers import (
        GenerationConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    dest = Path(dest)
    tokenizer = build_tokenizer()
    token = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS), strict=True))

    config = LlavaNextConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 8192,
            "bos_token_id": token["<|endoftext|>"],
            "eos_token_id": token["<|im_end|>"],
            "pad_token_id": token["<|endoftext|>"],
        },
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TILE,
            "patch_size": PATCH,
            "projection_dim": 32,
        },
        image_token_index=token[IMAGE_TOKEN],
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(TILE // PATCH) ** 2,
        architectures=["LlavaNextForConditionalGeneration"],
    )
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config).eval()

    letters = set(range(ord("a"), ord("z") + 1))
    model.generation_config = GenerationConfig(
        do_sample=False,
        bos_token_id=token["<|endoftext|>"],
        eos_token_id=[token["<|im_end|>"], token["<|endoftext|>"]],
        pad_token_id=token["<|endoftext|>"],
        suppress_tokens=[i for i in range(VOCAB_SIZE) if i not in letters],
    )

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )

    dest.mkdir(parents=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DEST")
    print(build(Path(sys.argv[1])))
