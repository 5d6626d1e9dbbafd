"""The tiny Qwen2-VL-style model of the embedded default, built locally (nothing from a hub).

``build_tiny(words, ...)`` -> (model, tokenizer, image_processor):

* tokenizer: a word-level ``tokenizers`` model over the Qwen-VL special tokens, the tags
  ``<think> </think> <answer> </answer>`` (added tokens, kept when decoding) and
  ``words``; split on whitespace and punctuation. Wrapped as a
  ``PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|endoftext|>``), so
  ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it.
* model: transformers' own ``Qwen2VLForConditionalGeneration`` (arch "qwen2_vl") or
  ``Qwen2_5_VLForConditionalGeneration`` ("qwen2_5_vl") from a config at tiny sizes.
* image processor: ``Qwen2VLImageProcessorPil`` fixed to image_size x image_size pixels
  (patch 14, merge 2: (image_size / 28)^2 image tokens per image).
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["SPECIAL_TOKENS", "TAG_TOKENS", "ARCHS", "build_tiny_tokenizer", "build_tiny"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
ARCHS = ("qwen2_vl", "qwen2_5_vl")


def build_tiny_tokenizer(words: Sequence[str]):
    """Word-level tokenizer over the special tokens, the tags, "[UNK]" and ``words``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in [*SPECIAL_TOKENS, *TAG_TOKENS, "[UNK]", *words]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    tk.add_tokens([AddedToken(s, special=False, normalized=False) for s in TAG_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]")


def build_tiny(words: Sequence[str], *, arch: str = "qwen2_vl", hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4, vision_hidden_size: int = 32, vision_depth: int = 2, image_size: int = 56,
               seed: int = 0):
    """(model, tokenizer, image_processor) at the given sizes, weights drawn with ``seed``."""
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if arch not in ARCHS:
        raise ValueError(f"model.tiny.arch must be one of {ARCHS}, got {arch!r}")
    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim % 8:
        raise ValueError(f"model.tiny.hidden_size / num_heads must be a multiple of 8 (M-RoPE sections), "
                         f"got {hidden_size} / {num_heads}")
    tok = build_tiny_tokenizer(words)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    half = head_dim // 2  # M-RoPE splits the rotary half into (temporal, height, width)
    mrope = [half - 2 * (half // 4), half // 4, half // 4]
    vocab = len(tok)
    special = dict(bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                   pad_token_id=ids["<|endoftext|>"])
    text = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                **special)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=False, **special)
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as cls

        cfg = Qwen2VLConfig(text_config=text, vision_config=dict(
            depth=vision_depth, embed_dim=vision_hidden_size, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3), **common)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as cls

        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
            num_heads=2, out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1],
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=image_size), **common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.generation_config.eos_token_id = special["eos_token_id"]
    model.generation_config.pad_token_id = special["pad_token_id"]
    improc = Qwen2VLImageProcessorPil(min_pixels=image_size * image_size, max_pixels=image_size * image_size)
    return model, tok, improc
