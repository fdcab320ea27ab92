"""
A teacher served by a real `trl vllm-serve` (the lab task's teacher, one server for the module): TIP, PACED and the
bridge's OPD stage train from it with no teacher weights in the training process; `token_selection="all"` is TRL's
`ServerDistillationTrainer` loss on the same batch; a top-k that covers the vocabulary gives the local teacher's loss;
an unreachable server or one with another tokenizer fails at init; a server that stops answering mid-run is retried a
bounded number of times, then fails naming the step, and no step is taken on the batch it left without log-probs.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from trl_tip.served_teacher import TeacherServerError
from trl_tip.tasks.lab import build_lab_dataset


pytestmark = pytest.mark.vllm

LAB = Path(__file__).resolve().parents[1] / "data" / "lab" / "lab-v4-n1500-30-60-seed0"
STUDENT, TEACHER = str(LAB / "student"), str(LAB / "teacher")
VOCAB = 259
BATCH = 4
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def prompts():
    return build_lab_dataset()["train"].select(range(8))


def _settings(tmp_path, url, **overrides):
    settings = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": BATCH, "max_steps": 2, "bf16": False,
        "use_cpu": True, "report_to": "none", "save_strategy": "no", "max_completion_length": MAX_TOKENS,
        "learning_rate": 1e-3, "logging_steps": 1, "shuffle_dataset": False, "seed": 0,
        "teacher_model_server_url": url,
    }  # fmt: skip
    return {**settings, **overrides}


def _tip(tmp_path, url, prompts, **overrides):
    from trl_tip import TipDistillConfig, TipDistillTrainer

    return TipDistillTrainer(model=STUDENT, args=TipDistillConfig(**_settings(tmp_path, url, **overrides)),
                             train_dataset=prompts)


def assert_no_teacher_weights(trainer):
    """No model of the teacher's exists in this process: the trainer holds none, and no module loaded its weights."""
    from transformers import PreTrainedModel

    assert trainer.teacher_model is None
    loaded = {str(getattr(obj, "name_or_path", "")) for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)}
    assert TEACHER not in loaded and not any(path.rstrip("/").endswith("/teacher") for path in loaded), loaded


def _trained(trainer):
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == trainer.args.max_steps and all(torch.isfinite(torch.tensor(losses)))
    changed = any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
    assert changed, "no parameter moved"
    return trainer


def _batch(trainer, prompts):
    trainer.model.eval()
    with torch.no_grad():
        return trainer._generate_and_score_completions(list(prompts.select(range(BATCH))))


# ---- Training from the served teacher ----


@pytest.mark.parametrize("selection", ["soft_or", "all"])
def test_tip_trains_from_the_served_teacher(served_lab_teacher, prompts, tmp_path, selection):
    trainer = _tip(tmp_path, served_lab_teacher, prompts, token_selection=selection, loss_top_k=8)
    _trained(trainer)
    assert_no_teacher_weights(trainer)
    kept = [entry["tip/kept_fraction"] for entry in trainer.state.log_history if "tip/kept_fraction" in entry]
    assert kept and all(value == (1.0 if selection == "all" else pytest.approx(0.5, abs=0.1)) for value in kept)


def test_paced_forward_track_generates_with_the_server(served_lab_teacher, prompts, tmp_path):
    from trl_tip import PacedConfig, PacedTrainer

    args = PacedConfig(**_settings(tmp_path, served_lab_teacher, loss_top_k=8), rollout_source="teacher",
                       kl_schedule="forward", teacher_completions="generate", paced_alpha=0.0, paced_beta=0.0,
                       pass_rate_rollouts=1, token_selection="all")
    trainer = PacedTrainer(model=STUDENT, args=args, train_dataset=prompts, reward_funcs="math")
    written = []
    generate = trainer.served_teacher.generate

    def recording_generate(prompt_ids, step, **sampling):  # the real request, counted
        completions = generate(prompt_ids, step, **sampling)
        written.extend(completions)
        return completions

    trainer.served_teacher.generate = recording_generate
    _trained(trainer)
    assert_no_teacher_weights(trainer)
    assert len(written) == args.max_steps * BATCH and all(written)


def test_paced_reverse_track_trains_from_the_served_teacher(served_lab_teacher, prompts, tmp_path):
    from trl_tip import PacedConfig, PacedTrainer

    args = PacedConfig(**_settings(tmp_path, served_lab_teacher), paced_alpha=0.0, paced_beta=0.0, pass_rate_rollouts=1,
                       token_selection="soft_or")
    trainer = PacedTrainer(model=STUDENT, args=args, train_dataset=prompts, reward_funcs="math")
    _trained(trainer)
    assert_no_teacher_weights(trainer)


def test_bridge_opd_stage_trains_from_the_served_teacher(served_lab_teacher, prompts, tmp_path):
    from trl_tip import bridge

    script_args, _, model_args, _, raw = bridge.parse_arguments([
        "--model_name_or_path", STUDENT, "--teacher_model_server_url", served_lab_teacher, "--loss_top_k", "4",
        "--output_dir", str(tmp_path), "--per_device_train_batch_size", str(BATCH), "--num_generations", "4",
        "--opd_max_steps", "2",
        "--max_completion_length", str(MAX_TOKENS), "--report_to", "none", "--bf16", "false", "--use_cpu", "true",
        "--token_selection", "soft_or", "--save_strategy", "no", "--learning_rate", "1e-3"])  # fmt: skip
    paths = {"teacher": None, "student": STUDENT}
    metrics = bridge.train_stage("opd", script_args, raw, model_args, str(tmp_path), paths, prompts, None)
    assert metrics["teacher"] == served_lab_teacher and metrics["trainer"] == "TipDistillTrainer"
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert (tmp_path / "opd" / "model.safetensors").is_file()


# ---- Equal to TRL, and to the local teacher ----


@pytest.mark.parametrize(("beta", "top_k"), [(1.0, 1), (0.5, 1), (0.0, 8)])
def test_all_tokens_is_trls_server_distillation_loss(served_lab_teacher, prompts, tmp_path, beta, top_k):
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    trainer = _tip(tmp_path / "tip", served_lab_teacher, prompts, token_selection="all", beta=beta, loss_top_k=top_k)
    batch = _batch(trainer, prompts)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    trl_args = ServerDistillationConfig(**{**_settings(tmp_path / "trl", served_lab_teacher), "beta": beta,
                                           "loss_top_k": top_k})
    reference = ServerDistillationTrainer(model=STUDENT, args=trl_args, train_dataset=prompts)
    reference.model.eval()
    with torch.no_grad():
        expected = reference.compute_loss(reference.model, batch)
    # Both read the same server answer and the same student weights; they differ only in float32 summation order.
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_top_k_over_the_whole_vocabulary_is_the_local_teacher_loss(served_lab_teacher, prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    from trl_tip import TipDistillConfig, TipDistillTrainer

    served = _tip(tmp_path / "served", served_lab_teacher, prompts, token_selection="all", loss_top_k=VOCAB)
    batch = _batch(served, prompts)
    local = TipDistillTrainer(model=STUDENT, teacher_model=TEACHER, train_dataset=prompts, args=TipDistillConfig(
        **{**_settings(tmp_path / "local", None), "token_selection": "all"}))
    local.model.eval()
    with torch.no_grad():
        served_loss = served.compute_loss(served.model, batch)
        local_loss = local.compute_loss(local.model, batch)
        # The tolerance: the loss is a mean over tokens of Σ_v p_s(v) (log p_s(v) − log p_t(v)) (+ a tail bucket that
        # holds no mass here), so replacing each log p_t by the server's, off by at most ε, moves it by at most ε. ε is
        # measured on this batch: the server's float32 log-probs against the local teacher's.
        teacher = AutoModelForCausalLM.from_pretrained(TEACHER).eval()
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        length = batch["completion_ids"].size(1)
        logprobs = teacher(input_ids=ids, attention_mask=attention).logits[:, -length - 1 : -1].log_softmax(-1)
        mask = batch["completion_mask"].bool()
        served_values = batch["served_topk_logprobs"][mask]
        local_values = logprobs[mask].gather(-1, batch["served_topk_ids"][mask])
        epsilon = (served_values - local_values).abs().max().item()
    # The tail bucket of each side holds at most 1e-7 (TRL's clamp): its term is below 1e-7 · ln(1e7) ≈ 2e-6; the
    # student's log-softmax is computed in another order on each path (float32: a few 1e-7 relative).
    assert epsilon < 1e-3
    assert abs(served_loss.item() - local_loss.item()) <= epsilon + 2e-6 + 1e-5 * abs(local_loss.item())


# ---- Failures ----


def test_an_unreachable_server_fails_at_init_naming_the_url(prompts, tmp_path, free_port):
    url = f"http://127.0.0.1:{free_port}"
    with pytest.raises(TeacherServerError, match=f"teacher_model_server_url='{url}'"):
        _tip(tmp_path, url, prompts)


def test_a_server_with_another_tokenizer_fails_at_init(served_lab_teacher, prompts, tmp_path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trl_tip import tiny_models

    # The lab tokenizer's 259 tokens with the three special tokens first: same size, other ids.
    byte_map = tiny_models._bytes_to_unicode()
    vocab = {token: index for index, token in enumerate(tiny_models.SPECIAL_TOKENS)}
    vocab.update({byte_map[byte]: len(vocab) for byte in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in tiny_models.SPECIAL_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tiny_models.END_OF_TURN,
                                        pad_token=tiny_models.PAD_TOKEN, padding_side="left",
                                        chat_template=tiny_models.CHAT_TEMPLATE)
    student = tiny_models.save_pretrained_pair(tiny_models.tiny_model("student", tokenizer=tokenizer), tokenizer,
                                               tmp_path / "student")
    from trl_tip import TipDistillConfig, TipDistillTrainer

    with pytest.raises(TeacherServerError, match=f"teacher_model_server_url='{served_lab_teacher}'.*token id 0"):
        TipDistillTrainer(model=student, args=TipDistillConfig(**_settings(tmp_path, served_lab_teacher)),
                          train_dataset=prompts)


class _Relay:
    """
    An HTTP relay in front of the real server, which can make the next log-probability requests (`POST
    /v1/completions`) hang past the client's timeout or drop the connection, as a server that stalls or goes away.
    """

    def __init__(self, upstream: str):
        target = urlparse(upstream)
        relay = self
        # Requests forwarded; to hang, to drop; after how many forwarded ones every request is dropped (None: never).
        self.forwarded, self.hang, self.drop, self.answered = 0, 0, 0, None
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and self.path == "/v1/completions":
                    with relay.lock:
                        hang = relay.hang > 0
                        drop = not hang and (relay.drop > 0 or (relay.answered is not None
                                                                and relay.forwarded >= relay.answered))
                        relay.hang -= hang
                        relay.drop -= drop and relay.drop > 0
                        relay.forwarded += not (hang or drop)
                    if hang:
                        time.sleep(3.0)
                    if hang or drop:
                        self.close_connection = True
                        return
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                connection.request(self.command, self.path, body=body or None,
                                   headers={key: value for key, value in self.headers.items() if key != "Host"})
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                connection.close()

            do_GET = do_POST = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @contextlib.contextmanager
    def running(self):
        self.thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


def test_a_stalled_request_is_retried(served_lab_teacher, prompts, tmp_path):
    with _Relay(served_lab_teacher).running() as relay:
        trainer = _tip(tmp_path, relay.url, prompts, teacher_server_timeout=1.0, teacher_server_retries=2,
                       teacher_server_backoff=0.1)
        relay.hang, relay.drop = 1, 1  # the first step's request times out, its retry is dropped, the next answers
        _trained(trainer)
        assert relay.hang == 0 and relay.drop == 0


def test_a_server_that_goes_away_stops_training_at_that_step(served_lab_teacher, prompts, tmp_path):
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        parameters = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            Snapshot.parameters = {name: p.detach().clone() for name, p in model.named_parameters()}

    with _Relay(served_lab_teacher).running() as relay:
        trainer = _tip(tmp_path, relay.url, prompts, max_steps=3, teacher_server_retries=2,
                       teacher_server_backoff=0.1)
        trainer.add_callback(Snapshot())
        relay.answered = 1  # step 1's request is answered; from step 2 on, every request is dropped
        with pytest.raises(TeacherServerError, match=r"training step 2 after 3 attempts.*Nothing was trained"):
            trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.equal(p, Snapshot.parameters[name]) for name, p in trainer.model.named_parameters())


def test_the_example_distils_from_the_server(served_lab_teacher, arithmetic_models, tmp_path):
    # The built-in task's student reads the lab tokenizer (the same 259 tokens), so the lab teacher's server serves it.
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    result = subprocess.run([
        sys.executable, str(root / "examples" / "tip_distill.py"), "--teacher_model_server_url", served_lab_teacher,
        "--loss_top_k", "8", "--max_steps", "2", "--num_eval_problems", "8", "--output_dir", str(tmp_path / "out"),
    ], capture_output=True, text=True, env=env, cwd=root, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "student accuracy after:" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
