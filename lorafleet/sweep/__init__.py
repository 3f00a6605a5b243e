"""Sweeps: hyperparameter search over a job on Ray Tune, each trial an ordinary lorafleet run.

`space` reads and checks a sweep file (a job spec plus a `sweep:` section) before anything starts; `runner` runs the
trials on Ray Tune (ASHA stops those that fall behind) and summarizes them. `lorafleet sweep` is the command.
"""
