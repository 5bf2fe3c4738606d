"""Merge methods: linear / soup, SLERP, task arithmetic, TIES, DARE, breadcrumbs, model stock and
passthrough, as streaming passes over checkpoint folders that take mergekit's YAML configs.

The math (one module per family: :mod:`merge.linear`, :mod:`merge.slerp`,
:mod:`merge.task_arithmetic` with :mod:`merge.sparsify`, :mod:`merge.model_stock`,
:mod:`merge.passthrough`) is functions of one output tensor's inputs, written once for numpy
arrays and torch tensors where the array API allows (:mod:`merge.arith`; the numpy engine
:mod:`merge.engine_numpy` never imports torch, the torch engine :mod:`merge.engine_torch` runs every
method on any device); :mod:`merge.methods` names them;
:mod:`merge.config`, :mod:`merge.params`, :mod:`merge.plan` and :mod:`merge.sources` turn a config
and the inputs' headers into a checked plan; :mod:`merge.run` streams it into a checkpoint folder;
:mod:`merge.cli` is the ``weightsmith merge`` command.
"""
