"""Text to tokens and back: the lossless SentencePiece-style tokenizer (digits split, UTF-8 byte
fallback), prompt templates, and the chat template.

May import: core.
"""
