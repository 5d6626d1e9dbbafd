"""A tiny random Qwen2-VL built locally (no hub): model, word-level tokenizer and PIL image
processor, for CPU tests of the generation and evaluation paths.

``build_tiny_vlm(seed=0)`` -> (model, tokenizer, image_processor); ``save_tiny_vlm(dir)``
writes them as a checkpoint directory that ``HFEngine.from_pretrained`` loads.
"""

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
WORDS = ["[UNK]", "user", "assistant", "system", "<think>", "</think>", "<answer>", "</answer>",
         "yes", "no", "Yes", "No", "A", "B", "C", "D", "2", "two", "person", "```json", "```",
         '[{"bbox_2d":', "[4,", "6,", "20,", "38],", '"label":', '"person"}]']
VOCAB_SIZE = 64


def build_tiny_vlm(seed: int = 0):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="[UNK]")
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        vocab_size=VOCAB_SIZE, bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    improc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    return model, tok, improc


def save_tiny_vlm(directory, seed: int = 0):
    model, tok, improc = build_tiny_vlm(seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    improc.save_pretrained(directory)
    return directory
