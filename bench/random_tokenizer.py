"""A SentencePiece tokenizer for random-weight Gemma files (the bench's full-size set and the tests' tiny one):
every prompt is padded to a fixed length, so the real tokenizer is not needed."""

from __future__ import annotations

import io

import torch

TOKENIZER_TEXT = ["A woman with long brown hair walks along a beach at sunset, waves rolling in.",
                  "A red car drives through a rainy city street at night, neon lights reflecting on the asphalt.",
                  "The camera slowly pushes in on an old man playing chess in a sunny park.",
                  "A cat jumps onto a wooden table and knocks over a glass of water."] * 8


def sentencepiece_tokenizer(vocab_size: int) -> torch.Tensor:
    """A SentencePiece model with Gemma's pad 0, eos 1, bos 2 and unk 3, as the uint8 tensor ComfyUI's Gemma
    files carry (the real tokenizer is not needed for random weights: every prompt is padded to 1,024 tokens)."""
    import sentencepiece  # a ComfyUI requirement
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_TEXT), model_writer=model,
                                             vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1,
                                             bos_id=2, unk_id=3, minloglevel=2)
    return torch.frombuffer(bytearray(model.getvalue()), dtype=torch.uint8)
