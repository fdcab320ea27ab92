"""Built-in tasks: small, procedurally generated, verifiable problems that run offline on a CPU."""

from .arithmetic import (
    ArithmeticTask,
    build_arithmetic_dataset,
    evaluate_accuracy,
    prepare_arithmetic_models,
    worked_solution,
)


__all__ = [
    "ArithmeticTask",
    "build_arithmetic_dataset",
    "evaluate_accuracy",
    "prepare_arithmetic_models",
    "worked_solution",
]
