"""Model directories and adapters on disk: loading, checking and saving a model directory, and LoRA
adapters (attach, save, load, merge).

May import: model, core, text.
"""
