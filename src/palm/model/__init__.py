"""The network: PalmConfig (with the paper's presets), the decoder with parallel attention + MLP blocks,
and its loss. These three files are copied next to every saved model (Transformers' `auto_map`), so
they import nothing of palm, only torch and transformers.

May import: nothing.
"""
