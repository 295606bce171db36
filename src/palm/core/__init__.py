"""What every layer shares: typed errors, atomic writes, device and dtype choice, typed settings files,
the run folder's layout, and the held-out loss (one definition for training and evaluation).

May import: model.
"""
