"""
A teacher served by `trl vllm-serve`: the connection checked at trainer init, the served tokenizer compared with the
student's, and each request retried with backoff a bounded number of times, then failed naming the server and the
training step.

The teacher's log-probabilities come from TRL's `VLLMClient.get_sequence_logprobs` (top-k per completion token and
the log-probability of the token the completion holds), laid out on the batch's `(B, T)` completion grid
([`~trl_tip.served_loss.ServedTeacherLogprobs`]); completions the teacher writes (PACED's forward-KL track) come from
`VLLMClient.generate` on the same server.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from ._trl_compat import teacher_request_inputs
from .served_loss import ServedTeacherLogprobs
from .vocabulary import compare_tokenizers, tokenizer_of


logger = logging.getLogger(__name__)

# Token ids probed through the server's `/detokenize`, spread evenly over the student's tokenizer.
_PROBED_IDS = 64
_PROBE_TEXT = "Solve: 12 + 345 = ? The answer is 357.\n"


class TeacherServerError(RuntimeError):
    """The teacher server could not be reached, answered for another model, or returned no log-probabilities."""


def _server_error_types() -> tuple[type[BaseException], ...]:
    import requests

    return (requests.exceptions.RequestException, ConnectionError, TimeoutError)


def _request_failed(error: BaseException) -> bool:
    # `VLLMClient` raises a bare `Exception("Request failed: <status>, ...")` on a non-200 answer; 5xx are transient.
    return type(error) is Exception and str(error).startswith("Request failed: 5")


def _adapter_with_timeout(timeout: float):
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        """No retries of its own (the retries are counted by [`ServedTeacher`]) and a timeout on every request."""

        def send(self, request, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout
            return super().send(request, **kwargs)

    return TimeoutAdapter(max_retries=0)


class ServedTeacher:
    """
    The client of a teacher served by `trl vllm-serve` at `url`.

    Built at trainer init: it fails there, with the URL, when the server does not answer or answers with another
    tokenizer than the student's.

    Args:
        url (`str`): the server's base URL, e.g. `"http://127.0.0.1:8000"`.
        timeout (`float`): seconds a request may take before it counts as failed.
        retries (`int`): how many times a failed request is sent again before training stops.
        backoff (`float`): seconds before the first retry; doubled before each next one.
    """

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 3, backoff: float = 2.0):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self._probe()
        from trl.generation.vllm_client import VLLMClient

        try:
            self.client = VLLMClient(base_url=url, connection_timeout=0.0)
        except ImportError as error:
            raise ImportError(
                f"teacher_model_server_url={url!r} needs TRL's vLLM client, which imports vLLM in the training "
                f"process too: pip install 'trl[vllm]' ({error})."
            ) from error
        except Exception as error:  # noqa: BLE001 - whatever failed, the message names the URL and the field
            raise TeacherServerError(
                f"No teacher server answers at teacher_model_server_url={url!r} ({type(error).__name__}: {error}). "
                "Start it with `trl vllm-serve --model TEACHER --port PORT` and pass its address."
            ) from error
        adapter = _adapter_with_timeout(timeout)
        self.client.session.mount("http://", adapter)
        self.client.session.mount("https://", adapter)
        self.model = self.client.model

    def _probe(self) -> None:
        # Before TRL's client, whose health check waits forever on a server that answers something else than 200.
        import requests

        where = f"teacher_model_server_url={self.url!r}"
        try:
            health = requests.get(f"{self.url.rstrip('/')}/health", timeout=min(self.timeout, 30.0))
            models = requests.get(f"{self.url.rstrip('/')}/v1/models", timeout=min(self.timeout, 30.0))
        except requests.exceptions.RequestException as error:
            raise TeacherServerError(
                f"No teacher server answers at {where} ({type(error).__name__}: {error}). Start it with "
                "`trl vllm-serve --model TEACHER --port PORT` and pass its address."
            ) from error
        try:
            served = models.json()["data"][0]["id"] if models.status_code == 200 else None
        except (ValueError, KeyError, IndexError, TypeError):
            served = None
        if health.status_code != 200 or served is None:
            raise TeacherServerError(
                f"The server at {where} is not a vLLM server serving a model: GET /health answered "
                f"{health.status_code} and GET /v1/models {models.status_code}. Point it at `trl vllm-serve --model "
                "TEACHER`."
            )

    # ---- The served tokenizer ----

    def _post(self, path: str, payload: dict) -> dict:
        response = self.client.session.post(f"{self.client.base_url}{path}", json={"model": self.model, **payload})
        if response.status_code != 200:
            raise TeacherServerError(f"{path} answered {response.status_code}: {response.text[:200]}")
        return response.json()

    def check_tokenizer(self, student_tokenizer) -> None:
        """
        Fail unless the server reads the student's token ids: each of a spread of ids (and every special token) is
        detokenised by the server and by the student's tokenizer, and a probe text tokenised by both; when the served
        model is a local directory with a tokenizer, the two tokenizers are also compared in full, as for a local
        teacher ([`~trl_tip.vocabulary.compare_tokenizers`]).
        """
        tokenizer = tokenizer_of(student_tokenizer)
        size = len(tokenizer)
        ids = sorted({*range(0, size, max(1, size // _PROBED_IDS)), size - 1, *tokenizer.all_special_ids})
        where = f"The teacher server at teacher_model_server_url={self.url!r} (serving {self.model!r})"
        advice = "Serve a teacher with the student's tokenizer: distillation compares the two models id by id."
        for token_id in ids:
            expected = tokenizer.decode([token_id])
            try:
                served = self._post("/detokenize", {"tokens": [token_id]})["prompt"]
            except TeacherServerError as error:
                raise TeacherServerError(
                    f"{where} cannot detokenize id {token_id} of the student's {size}-token vocabulary ({error}). "
                    + advice
                ) from None
            if served != expected:
                raise TeacherServerError(
                    f"{where} reads token id {token_id} as {served!r}, the student's tokenizer as {expected!r}. "
                    + advice
                )
        expected = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
        served = self._post("/tokenize", {"prompt": _PROBE_TEXT, "add_special_tokens": False})["tokens"]
        if served != expected:
            raise TeacherServerError(
                f"{where} tokenizes {_PROBE_TEXT!r} as {served}, the student's tokenizer as {expected}. " + advice
            )
        served_tokenizer = self._local_tokenizer()
        if served_tokenizer is not None:
            comparison = compare_tokenizers(tokenizer, served_tokenizer)
            if comparison.error is not None:
                raise TeacherServerError(f"{where} has another tokenizer than the student: {comparison.error}. "
                                         + advice)

    def _local_tokenizer(self):
        if not os.path.isdir(self.model) or not any(
            os.path.isfile(os.path.join(self.model, name)) for name in ("tokenizer.json", "tokenizer_config.json")
        ):
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.model)
        except (OSError, ValueError, TypeError, KeyError):
            return None

    # ---- Requests during training ----

    def _with_retries(self, what: str, step: int, send: Callable[[], Any]) -> Any:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return send()
            except Exception as error:  # noqa: BLE001 - filtered just below
                if not isinstance(error, _server_error_types()) and not _request_failed(error):
                    raise
                if attempt == self.retries:
                    raise TeacherServerError(
                        f"The teacher server at teacher_model_server_url={self.url!r} did not answer {what} for "
                        f"training step {step} after {self.retries + 1} attempts (timeout {self.timeout:g} s each); "
                        f"last error: {type(error).__name__}: {error}. Nothing was trained on this batch."
                    ) from error
                logger.warning(
                    "The teacher server at %s failed %s for step %d (%s); retrying in %.3g s (%d of %d).",
                    self.url, what, step, error, delay, attempt + 1, self.retries,
                )
                time.sleep(delay)
                delay *= 2

    def sequence_logprobs(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        top_k: int,
        temperature: float,
        step: int,
    ) -> ServedTeacherLogprobs:
        """
        The teacher's log-probabilities of a batch of completions, on the `(B, T)` completion grid: its top-k (ids and
        values) and the log-probability of each completion token. Fails, naming the step, when the server does not
        answer within the retries, or when it leaves a completion token without a log-probability: no step is ever
        taken on a batch with missing teacher data.

        The prompt is left-padded and the completion right-padded (TRL's layout); `completion_mask` marks the
        positions scored.
        """
        mask = completion_mask.bool()
        sequences, prompt_lengths, completion_lengths = teacher_request_inputs(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
            prompt_attention_mask=prompt_mask,
        )
        batch, length = completion_ids.shape
        topk_ids = torch.zeros(batch, length, top_k, dtype=torch.long)
        topk_logprobs = torch.full((batch, length, top_k), float("-inf"))
        sampled_logprobs = torch.full((batch, length), float("-inf"))
        scored = [i for i, n in enumerate(completion_lengths) if n > 0]
        if scored:
            result = self._with_retries(
                "a log-probability request",
                step,
                lambda: self.client.get_sequence_logprobs(
                    sequences=[sequences[i] for i in scored],
                    prompt_lengths=[prompt_lengths[i] for i in scored],
                    top_logprobs=top_k,
                    temperature=temperature,
                ),
            )
            for j, i in enumerate(scored):
                # The completion's scored tokens, in order; the request holds exactly these (the mask is contiguous
                # from the start of the completion, as TRL's generation writes it).
                positions = mask[i].nonzero().squeeze(-1)
                n = min(positions.numel(), len(result["logprobs"][j]))
                positions = positions[:n]
                topk_ids[i, positions] = torch.tensor(result["logprob_token_ids"][j][:n], dtype=torch.long)
                topk_logprobs[i, positions] = torch.tensor(result["logprobs"][j][:n], dtype=torch.float32)
                sampled_logprobs[i, positions] = torch.tensor(
                    [values[0] for values in result["actual_logprobs"][j][:n]], dtype=torch.float32
                )
        missing = mask.cpu() & ~(torch.isfinite(sampled_logprobs) & torch.isfinite(topk_logprobs[..., 0]))
        if missing.any():
            raise TeacherServerError(
                f"The teacher server at teacher_model_server_url={self.url!r} returned no log-probability for "
                f"{int(missing.sum())} of the {int(mask.sum())} completion tokens of training step {step}; nothing "
                "was trained on this batch. Check that the server's max_model_len holds prompt and completion, and "
                "that it was started by `trl vllm-serve` (which lifts vLLM's cap on returned log-probabilities)."
            )
        device = completion_ids.device
        return ServedTeacherLogprobs(topk_ids.to(device), topk_logprobs.to(device), sampled_logprobs.to(device))

    def generate(self, prompt_ids: list[list[int]], step: int, **sampling) -> list[list[int]]:
        """Completions the teacher writes for token-id prompts (`VLLMClient.generate`'s sampling arguments)."""
        result = self._with_retries(
            "a generation request", step, lambda: self.client.generate(prompts=prompt_ids, n=1, **sampling)
        )
        return result["completion_ids"]
