"""Built-in tasks: small, procedurally generated, verifiable problems that run offline on a CPU."""

from .arithmetic import (
    ArithmeticTask,
    build_arithmetic_dataset,
    evaluate_accuracy,
    prepare_arithmetic_models,
    worked_solution,
)
from .lab import (
    CONCISE_PARAPHRASES,
    LabTask,
    accuracy_by_level,
    build_lab_dataset,
    check_preconditions,
    measure_preconditions,
    styled_split,
    verbose_solution,
)
from .lab_preparation import prepare_lab_models


__all__ = [
    "CONCISE_PARAPHRASES",
    "ArithmeticTask",
    "LabTask",
    "accuracy_by_level",
    "build_lab_dataset",
    "check_preconditions",
    "measure_preconditions",
    "prepare_lab_models",
    "styled_split",
    "verbose_solution",
    "build_arithmetic_dataset",
    "evaluate_accuracy",
    "prepare_arithmetic_models",
    "worked_solution",
]
