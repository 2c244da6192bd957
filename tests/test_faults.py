"""Faults injected on purpose end as one clear line (exit 2) or a recovery, never a traceback, and lose nothing
committed: an endpoint answering malformed 200s, a corrupt latest checkpoint, unwritable output folders, bad configs, a
full disk, undecodable tree files; and no secret in an endpoint URL reaches any file a run writes."""

import http.server
import json
import pathlib
import threading

import pytest

from aloe_jax.cli import main
from tests.conftest import SHARED
from tests.test_llm import MALFORMED_200

SECRET = "sk-test-SECRET123"
ALOE_DATA = str(SHARED / "aloe_data")
PROFILES = ["You are a nurse in Lisbon with two cats.", "You are a retired carpenter in Manitoba."]
PERSONALITIES = ["You are blunt and impatient.", "You are warm, curious and chatty."]


class FakeEndpoint:
    """An OpenAI-compatible loopback endpoint: answers `reply` to the first `good_requests` requests (all when None),
    then a malformed 200 (`malformed`: content type, body). Its URL carries a fake key in userinfo and query."""

    def __init__(self):
        self.reply, self.good_requests, self.malformed, self.requests = "A", None, None, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                content_type, data = "application/json", json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": outer.reply}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()
                if outer.good_requests is not None and outer.requests > outer.good_requests:
                    content_type, data = outer.malformed
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        port = self.server.server_address[1]
        self.url = f"http://aloe:{SECRET}@127.0.0.1:{port}/v1?api_key={SECRET}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


def _assert_no_secret_in(folder: pathlib.Path):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    leaks = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaks == []


def _one_error_line(capsys) -> str:
    """The one error line a command printed (progress bars aside), checked to come without a traceback or a key."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and SECRET not in err
    [line] = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    return line.split("aloe-jax ", 1)[1]


def _trees_config(tmp_path, url: str, turns: int, name: str) -> str:
    (tmp_path / "profiles.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROFILES))
    (tmp_path / "personalities.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PERSONALITIES))
    backend = {"kind": "openai", "model": "m", "base_url": url, "max_retries": 1}
    roles = {r: {"backend": backend, "generation": {"max_tokens": 8}}
             for r in ("user", "extractor", "hinted", "plain", "judge")}
    cfg = {"seed": 3, "roles": roles,
           "trees": {"profiles": str(tmp_path / "profiles.jsonl"), "personalities": str(tmp_path / "personalities.jsonl"),
                     "conversations": 1, "turns": turns, "output": str(tmp_path / name / "trees.jsonl"),
                     "state_dir": str(tmp_path / name / "state")}}
    path = tmp_path / f"{name}.json"  # JSON is YAML
    path.write_text(json.dumps(cfg))
    return str(path)


def test_trees_on_an_endpoint_that_turns_malformed_keeps_committed_turns_and_records_no_key(endpoint, tmp_path, capsys):
    assert main(["trees", "--config", _trees_config(tmp_path, endpoint.url, 1, "good")]) == 0
    records = [json.loads(line) for line in (tmp_path / "good" / "trees.jsonl").read_text().splitlines()]
    assert records[0]["meta"]["roles"]["user"] == f"openai:m@http://127.0.0.1:{endpoint.server.server_address[1]}/v1"
    _assert_no_secret_in(tmp_path / "good")
    capsys.readouterr()

    # Turn 1 takes as many calls as in the run above; every call of turn 2 gets a malformed 200.
    per_turn, endpoint.requests = endpoint.requests, 0
    for kind, malformed in MALFORMED_200.items():
        endpoint.good_requests, endpoint.malformed, endpoint.requests = per_turn, malformed, 0
        name = f"bad-{kind.replace(' ', '-')}"
        assert main(["trees", "--config", _trees_config(tmp_path, endpoint.url, 2, name)]) == 2, kind
        assert "answered 200 with" in _one_error_line(capsys)
        committed = (tmp_path / name / "state" / "turns.jsonl").read_text().splitlines()
        assert [json.loads(line)["turn"] for line in committed] == [0], kind  # the first turn, kept
        _assert_no_secret_in(tmp_path / name)


@pytest.fixture(scope="module")
def tiny_model_folder(tiny_chat_engine, tmp_path_factory):
    """The tiny chat model as an HF folder with tokenizer, as `aloe-jax eval --model` loads it."""
    from aloe_jax.models.weights import export_hf

    folder = tmp_path_factory.mktemp("tiny_chat") / "model"
    export_hf(tiny_chat_engine.model, tiny_chat_engine.tokenizer, str(folder))
    return str(folder)


@pytest.mark.slow
def test_eval_on_an_endpoint_that_turns_malformed_resumes_losing_nothing_and_records_no_key(
        endpoint, tiny_model_folder, tmp_path, capsys):
    endpoint.reply = "4"  # a score the text judge reads
    spec = f"openai:m@{endpoint.url}"
    out = tmp_path / "eval"
    argv = ["eval", "--model", tiny_model_folder, "--simulator", spec, "--judge", spec, "--out", str(out),
            "--aloe-data", ALOE_DATA, "--cases", "1", "--turns", "2", "--quiet", "bootstrap_resamples=20",
            "model.generation.max_tokens=4", "simulator.backend.max_retries=1", "judge.backend.max_retries=1"]
    # Turn 1 of one case is one simulator call and one judge call; from turn 2 on every answer is malformed.
    endpoint.good_requests, endpoint.malformed = 2, MALFORMED_200["empty choices"]
    assert main(argv) == 2
    assert "eval: error: openai:m@http://127.0.0.1" in _one_error_line(capsys)
    committed = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert [r["turn"] for r in committed] == [1] and committed[0]["score"] == 4

    endpoint.good_requests = None  # the endpoint recovers: the rerun finishes turn 2 only
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert [r["turn"] for r in records] == [1, 2] and records[0] == committed[0]
    card = json.loads((out / "protocol.json").read_text())
    assert card["simulator"] == f"openai:m@http://127.0.0.1:{endpoint.server.server_address[1]}/v1"
    assert {"summary.json", "report.md", "protocol.json"} <= {p.name for p in out.iterdir()}
    _assert_no_secret_in(out)
