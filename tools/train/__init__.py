"""Training pipeline for the fan model: the reference service's pipeline, made sound.

Stages, each runnable alone through ``python -m tools.train <stage>`` and all
together through ``python -m tools.train all``::

    simulate -> scan -> features -> labels -> fit -> convert -> evaluate -> export

Working data lives under ``build/train`` (see :mod:`tools.train.layout`).
TensorFlow is imported only by the stages that need it (fit, convert), so the
data stages and the tests run without it.
"""
