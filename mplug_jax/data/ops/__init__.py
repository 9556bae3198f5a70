"""Transforms shared by the input pipelines: images, text, tokenizer, video frames, RandAugment."""
