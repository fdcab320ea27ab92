"""A served teacher's settings: refused at construction, naming the field, when they cannot work."""

import pytest

from trl_tip import PacedConfig, TipDistillConfig


URL = "http://127.0.0.1:8000"


def _config(cls=TipDistillConfig, **kwargs):
    return cls(output_dir="out", bf16=False, report_to="none", **kwargs)


def test_served_teacher_fields_default_to_trls():
    config = _config(teacher_model_server_url=URL)
    assert config.loss_top_k == 1 and config.teacher_model_server_url == URL


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_top_k": 0}, "loss_top_k must be at least 1"),
        ({"teacher_model_name_or_path": "teacher"}, "unset teacher_model_name_or_path"),
        ({"teacher_quantization": "4bit"}, "teacher_quantization='4bit'"),
        ({"teacher_server_retries": -1}, "teacher_server_retries"),
        ({"teacher_server_timeout": 0}, "teacher_server_timeout"),
        ({"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": URL + "/"}, "pushed into the teacher"),
    ],
)
def test_unusable_served_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(teacher_model_server_url=URL, **kwargs)


def test_paced_inherits_the_fields_and_refuses_a_served_self_teacher():
    assert _config(PacedConfig, teacher_model_server_url=URL, loss_top_k=8).loss_top_k == 8
    with pytest.raises(ValueError, match="self_distillation=True makes the teacher the student itself.*"
                                         "teacher_model_server_url"):
        _config(PacedConfig, teacher_model_server_url=URL, self_distillation=True)


def test_the_bridge_refuses_a_served_teacher_for_the_stage_that_trains_it(tmp_path):
    from trl_tip import bridge

    parsed = bridge.parse_arguments(["--model_name_or_path", "s", "--teacher_model_server_url", URL,
                                     "--stages", "teacher_rl,opd", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="teacher_rl stage trains the teacher"):
        bridge.run_bridge(*parsed)


def test_the_bridge_hands_the_server_to_its_distillation_stages(tmp_path):
    from trl_tip import bridge

    script_args, _, model_args, _, raw = bridge.parse_arguments([
        "--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--teacher_model_server_url", URL,
        "--loss_top_k", "4", "--output_dir", str(tmp_path), "--bf16", "false"])
    for stage in ("warmup", "opd"):
        config = bridge.stage_config(stage, raw, script_args, model_args, str(tmp_path))
        assert config.teacher_model_server_url == URL and config.loss_top_k == 4
        assert config.teacher_model_name_or_path is None


def _http_server(status: int):
    """A local HTTP server that answers every GET with `status` and a JSON body: not a vLLM server."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = b'{"detail": "not here"}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status", [404, 200])
def test_a_server_that_is_not_vllm_is_refused_naming_the_url(status):
    from trl_tip.served_teacher import ServedTeacher, TeacherServerError

    server = _http_server(status)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(TeacherServerError, match=f"teacher_model_server_url='{url}' is not a vLLM server"):
            ServedTeacher(url)
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_server_is_refused_naming_the_url():
    import socket

    from trl_tip.served_teacher import ServedTeacher, TeacherServerError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(TeacherServerError, match=f"No teacher server answers at teacher_model_server_url='{url}'"):
        ServedTeacher(url)
