"""Training: the loop and its two recipes (pretraining and fine-tuning), compute modes (compute
copies, activation checkpointing, compile), the Adafactor-style optimizer, checkpoints and resume,
the run's lock and log and the experiment trackers it also goes to, process groups, plots, and the
planner with its FLOP counts.

May import: model, core, text, data, weights, inference, evaluate.
"""
