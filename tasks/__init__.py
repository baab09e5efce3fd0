"""The tasks kdlab ships: one module each (classification.py, seq2seq.py), found through kdlab.distill.task.

No stage imports this package; the registry (kdlab.distill.task.BUILTIN) loads a task by its path.
"""
