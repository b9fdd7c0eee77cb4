"""Every merge method as data: one generalized task-arithmetic kernel configured by a table of named methods, plus
linear, slerp, nuslerp and model_stock, all matching mergekit's math tensor for tensor."""

from safemerge.merges.methods.inputs import Param, SearchRange, TensorInputs, chunked_dot, chunked_l1, combine
from safemerge.merges.methods.registry import (
    METHODS,
    TASK_ARITHMETIC_FAMILY,
    MergeMethod,
    searchable_methods,
    searched_params,
    sparsifies,
)
from safemerge.merges.methods.sparsify import SPARSIFIERS, Sparsification
from safemerge.merges.methods.task_arithmetic import Consensus, TaskArithmetic

__all__ = [
    "METHODS",
    "SPARSIFIERS",
    "TASK_ARITHMETIC_FAMILY",
    "Consensus",
    "MergeMethod",
    "Param",
    "SearchRange",
    "Sparsification",
    "TaskArithmetic",
    "TensorInputs",
    "chunked_dot",
    "chunked_l1",
    "combine",
    "searchable_methods",
    "searched_params",
    "sparsifies",
]
