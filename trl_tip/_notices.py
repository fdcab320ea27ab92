"""Third-party import-time notices that say nothing about a trl_tip run, filtered once when `trl_tip` is imported."""

import logging


class _WithoutOptionalKernelNotice(logging.Filter):
    """
    Drops bitsandbytes' import-time notice that the optional `kernels` package is missing. On CPUs with AVX512-BF16,
    bitsandbytes' CPU backend tries to fetch a 4-bit matmul kernel from the Hub through `kernels` and, without it,
    warns and uses its own kernel. PEFT imports bitsandbytes whenever it is installed, so every command (even
    `trl-tip --help`) printed the notice, quantising or not. Any other failure of that fetch is still reported.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        missing_kernels = bool(record.args) and isinstance(record.args[0], ImportError)
        return not (str(record.msg).startswith("Failed to load CPU gemm_4bit_forward") and missing_kernels)


# Effective for imports of bitsandbytes that come after `import trl_tip`: scripts import trl_tip before TRL's PEFT
# helpers (`trl.get_peft_config`, the trainers), which import PEFT and, through it, bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_WithoutOptionalKernelNotice())
