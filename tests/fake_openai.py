"""A loopback OpenAI-compatible chat endpoint for tests: the HTTP plumbing once; what it answers is the subclass's."""

import http.server
import json
import threading


def completion(model: str, text: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    """The JSON body of a successful chat completion answering `text`."""
    return json.dumps({
        "id": "x", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }).encode()


class LoopbackOpenAI:
    """Serves POST /v1/chat/completions on 127.0.0.1 in a thread; `respond(body)` gives (status, content type,
    bytes) of each answer."""

    def __init__(self):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, content_type, data = outer.respond(body)
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "10")  # keep the client's backoff short in tests
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def respond(self, body: dict) -> tuple[int, str, bytes]:
        raise NotImplementedError

    def close(self):
        self.server.shutdown()
        self.server.server_close()
