"""Merge methods: linear / soup, SLERP, task arithmetic, TIES, DARE, breadcrumbs, model stock and
passthrough, as streaming passes over checkpoint folders that take mergekit's YAML configs.

The math (one module per family: :mod:`merge.linear`, :mod:`merge.slerp`,
:mod:`merge.task_arithmetic` with :mod:`merge.sparsify`, :mod:`merge.model_stock`,
:mod:`merge.passthrough`) is pure functions on tensors; :mod:`merge.methods` names them;
:mod:`merge.config`, :mod:`merge.params`, :mod:`merge.plan` and :mod:`merge.sources` turn a config
and the inputs' headers into a checked plan; :mod:`merge.run` streams it into a checkpoint folder;
:mod:`merge.cli` is the ``weightsmith merge`` command.
"""
