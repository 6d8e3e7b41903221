"""Optimizers for Engram tables: row-wise updates that touch only the rows a batch used."""

from .rowwise import EngramOptimizer, build_optimizer, engram_param_groups, set_sparse_table_grads

__all__ = ["EngramOptimizer", "build_optimizer", "engram_param_groups", "set_sparse_table_grads"]
