"""Merge methods — every method of mergekit 0.1.5 (linear / soup, SLERP, NuSLERP, Multi-SLERP,
Karcher mean, task arithmetic, TIES, DARE, DELLA, breadcrumbs, SCE, RAM, model stock, Arcee Fusion,
NearSwap and passthrough) — as streaming passes over checkpoint folders that take mergekit's YAML
configs and write its bytes.

The math (one module per family: :mod:`merge.linear`, :mod:`merge.slerp`, :mod:`merge.nuslerp`,
:mod:`merge.multislerp`, :mod:`merge.karcher`, :mod:`merge.task_arithmetic` with
:mod:`merge.sparsify`, :mod:`merge.sce`, :mod:`merge.ram`, :mod:`merge.model_stock`,
:mod:`merge.arcee_fusion`, :mod:`merge.nearswap`, :mod:`merge.passthrough`) is functions of one
output tensor's inputs, written once for numpy arrays and torch tensors where the array API allows
(:mod:`merge.arith`; the numpy engine :mod:`merge.engine_numpy` never imports torch, the torch
engine :mod:`merge.engine_torch` runs every method on any device); :mod:`merge.methods` names them;
:mod:`merge.config`, :mod:`merge.params`, :mod:`merge.plan` and :mod:`merge.sources` turn a config
and the inputs' headers into a checked plan; :mod:`merge.run` streams it into a checkpoint folder.
"""
