"""`marble serve`'s bad input: one clear line and exit 2, before anything listens or loads.
(The command starting for real is exercised by tests/test_server_load.py.)"""
import socket

import pytest
from typer.testing import CliRunner

from marble.cli import app
from marble.cli.serve import is_loopback

runner = CliRunner()


def serve(*args, env=None):
    return runner.invoke(app, ["serve", *[str(a) for a in args]], env=env)


def one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marble: error: ") and text in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_missing_builtin_model_fails_with_one_line(tmp_path):
    r = serve("--port", 0, env={"MARBLE_MODELS": str(tmp_path)})
    one_line_error(r, "the built-in model is missing")


@pytest.mark.parametrize("args, text", [
    (["--model", "no-such-model", "--port", 0], "no model named 'no-such-model'"),
    (["--model", "tiny-random", "--model", "tiny-random"], "the same --model is given twice"),
    (["--port", 70000], "--port must be in 0..65535, got 70000"),
    (["--max-queue", -1], "--max-queue must be >= 0"),
    (["--max-steps", 0], "--max-steps must be >= 1, got 0"),
    (["--max-upload-mb", 0], "--max-upload-mb must be >= 1"),
    (["--api-key", " "], "--api-key is empty"),
    (["--log-level", "loud"], "--log-level must be one of"),
])
def test_bad_options_fail_with_one_line(args, text):
    one_line_error(serve(*args), text)


def test_a_taken_port_fails_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        one_line_error(serve("--model", "tiny-random", "--port", port), f"cannot listen on 127.0.0.1:{port}")


def test_outputs_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(serve("--outputs", tmp_path / "file"), "exists and is not a folder")


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
