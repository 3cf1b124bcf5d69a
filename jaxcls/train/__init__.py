"""Fine-tuning: the numerics (step), what trains (freeze), batches, the frozen-prefix cache, the
program built once per run, the loop with its hooks, resumable state and data parallelism."""

from jaxcls.train.batches import Prepared, prepare_data
from jaxcls.train.hooks import Interrupted
from jaxcls.train.loop import FitResult, fit, task_for
from jaxcls.train.program import Program, build_program, precompile

__all__ = ["FitResult", "Interrupted", "Prepared", "Program", "build_program", "fit", "precompile",
           "prepare_data", "task_for"]
