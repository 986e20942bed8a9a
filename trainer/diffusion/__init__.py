"""Diffusion math: schedules, objectives, loss weighting, CFG dropout, guidance and samplers.

Small modules, one idea each (the sgm layout): ``schedules`` -> ``objectives`` (+ ``weighting``) for
training, ``cfg_dropout`` for the condition, ``samplers`` + ``guidance`` + ``sampling`` for generation.
"""
