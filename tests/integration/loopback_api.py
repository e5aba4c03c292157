"""A loopback HTTP server that speaks enough of the Anthropic and OpenAI APIs for umi's providers.

Tests point the *real* SDK clients at it with ``base_url`` and script its answers:

    api.script("/v1/messages", reply(200, anthropic_tool_message(...)), ...)

Every request is checked the way the real API checks it (auth headers, required
fields, tool and ``response_format`` shapes, strict-schema rules, cache_control
blocks); a malformed request gets the 400 the real API would send, so a provider
bug shows up as a failing call, and the request is also recorded in
``api.requests`` for the test to inspect. A request that arrives when no answer
is scripted gets a 500 and is listed in ``api.unscripted``.

Nothing here touches the network beyond 127.0.0.1 on an ephemeral port.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

ANTHROPIC_MESSAGES = "/v1/messages"
OPENAI_CHAT = "/v1/chat/completions"
OPENAI_EMBEDDINGS = "/v1/embeddings"

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass
class Reply:
    """One scripted answer. ``body``: dict (sent as JSON), str or bytes (sent as is).

    ``delay_secs`` holds the answer back (a server that hangs past the client's timeout);
    ``trickle_secs`` sends the body 16 bytes at a time with that pause between (each read is
    quick, the whole answer is slow); ``header_trickle_secs`` sends the status line and headers
    one byte at a time with that pause between (the answer never gets past its headers in time).
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_secs: float = 0.0
    trickle_secs: float = 0.0
    header_trickle_secs: float = 0.0


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or the raw text when it did not parse
    at: float  # time.monotonic() when it arrived
    error: str | None = None  # why the request was rejected as malformed, if it was


Responder = Reply | Callable[[Recorded], Reply]


class LoopbackAPI:
    """A threaded HTTP server on 127.0.0.1 with a queue of scripted replies per path."""

    def __init__(self, *, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self.unscripted: list[Recorded] = []
        self._queues: dict[str, collections.deque[Responder]] = collections.defaultdict(collections.deque)
        self._defaults: dict[str, Responder] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ids = 0
        #: set when a client hung up while its headers were trickling in (``header_trickle_secs``)
        self.hung_up_in_headers = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect

            def do_POST(self) -> None:
                api._handle(self)

            def do_GET(self) -> None:
                api._send(self, Reply(404, {"error": {"type": "not_found_error", "message": "not found"}}))

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-api", daemon=True)
        self._thread.start()

    # --- control -----------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def anthropic_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"  # the Anthropic SDK appends /v1/messages

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"  # the OpenAI SDK appends /chat/completions

    def script(self, path: str, *replies: Responder) -> None:
        with self._lock:
            self._queues[path].extend(replies)

    def set_default(self, path: str, responder: Responder) -> None:
        """What ``path`` answers once its queue is empty (instead of the 'unscripted' 500)."""
        with self._lock:
            self._defaults[path] = responder

    def requests_to(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def pending(self, path: str) -> int:
        with self._lock:
            return len(self._queues[path])

    def close(self) -> None:
        self._stop.set()  # releases handlers that are 'hanging'
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            n = self._ids
        return f"{prefix}{n:024d}"

    # --- serving -----------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        path = h.path.split("?", 1)[0]
        if path.startswith("http://"):  # absolute form: the client sent it through us as its proxy
            path = "/" + path.split("/", 3)[3]
        rec = Recorded("POST", path, {k.lower(): v for k, v in h.headers.items()}, body, time.monotonic())
        auth_error, shape_error = _check_request(self, rec)
        rec.error = auth_error or shape_error
        with self._lock:
            self.requests.append(rec)
            responder: Responder | None = None
            if auth_error is None and shape_error is None:
                queue = self._queues[path]
                responder = queue.popleft() if queue else self._defaults.get(path)
                if responder is None:
                    self.unscripted.append(rec)
        if auth_error is not None:
            reply = _auth_failure(self, path, auth_error)
        elif shape_error is not None:
            reply = _bad_request(self, path, shape_error)
        elif responder is None:
            reply = Reply(500, {"error": {"type": "api_error", "message": f"no scripted reply for {path}"}})
        else:
            reply = responder(rec) if callable(responder) else responder
        self._send(h, reply)

    def _send(self, h: BaseHTTPRequestHandler, reply: Reply) -> None:
        if reply.delay_secs > 0 and self._stop.wait(reply.delay_secs):
            return  # shutting down
        if isinstance(reply.body, (dict, list)):
            payload = json.dumps(reply.body).encode()
            ctype = "application/json"
        elif isinstance(reply.body, str):
            payload = reply.body.encode()
            ctype = "application/json"  # malformed-body tests claim JSON and send something else
        elif isinstance(reply.body, bytes):
            payload = reply.body
            ctype = "application/json"
        else:
            payload = b""
            ctype = "application/json"
        headers = {"content-type": ctype, **{k.lower(): v for k, v in reply.headers.items()}}
        if h.path.startswith(ANTHROPIC_MESSAGES):
            headers.setdefault("request-id", self.next_id("req_"))
        else:
            headers.setdefault("x-request-id", self.next_id("req_"))
        try:
            if reply.header_trickle_secs > 0:
                head = f"HTTP/1.1 {reply.status} {h.responses.get(reply.status, ('',))[0]}\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in {**headers, "content-length": str(len(payload))}.items()) + "\r\n"
                try:
                    for byte in head.encode("latin-1"):
                        h.wfile.write(bytes([byte]))
                        h.wfile.flush()
                        if self._stop.wait(reply.header_trickle_secs):
                            return  # shutting down
                except (BrokenPipeError, ConnectionResetError):
                    self.hung_up_in_headers.set()
                    raise
            else:
                h.send_response(reply.status)
                for k, v in headers.items():
                    h.send_header(k, v)
                h.send_header("content-length", str(len(payload)))
                h.end_headers()
            if reply.trickle_secs > 0:
                for at in range(0, len(payload), 16):
                    h.wfile.write(payload[at:at + 16])
                    h.wfile.flush()
                    if self._stop.wait(reply.trickle_secs):
                        return  # shutting down
            else:
                h.wfile.write(payload)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


# --- request checks (what the real APIs refuse) -----------------------------


def _check_request(api: LoopbackAPI, rec: Recorded) -> tuple[str | None, str | None]:
    if rec.path == ANTHROPIC_MESSAGES:
        # anthropic 2.x sends the key as a bearer token; older SDKs and curl use x-api-key
        if api_key_of(rec) != api.api_key:
            return "invalid x-api-key", None
        return None, _check_anthropic(rec)
    if rec.path in (OPENAI_CHAT, OPENAI_EMBEDDINGS):
        if rec.headers.get("authorization") != f"Bearer {api.api_key}":
            return "Incorrect API key provided", None
        return None, _check_openai_chat(rec) if rec.path == OPENAI_CHAT else _check_openai_embeddings(rec)
    return None, f"unknown path {rec.path}"


def api_key_of(rec: Recorded) -> str | None:
    """The API key a request carried, from ``x-api-key`` or an ``Authorization: Bearer`` header."""
    if "x-api-key" in rec.headers:
        return rec.headers["x-api-key"]
    auth = rec.headers.get("authorization", "")
    return auth[len("Bearer "):] if auth.startswith("Bearer ") else None


def _check_cache_control(cc: Any, where: str) -> str | None:
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral" or set(cc) - {"type", "ttl"}:
        return f"{where}.cache_control: expected {{'type': 'ephemeral'}}, got {cc!r}"
    if "ttl" in cc and cc["ttl"] not in ("5m", "1h"):
        return f"{where}.cache_control.ttl must be '5m' or '1h'"
    return None


def _check_anthropic(rec: Recorded) -> str | None:
    b = rec.body
    if not rec.headers.get("anthropic-version"):
        return "anthropic-version: header is required"
    if not isinstance(b, dict):
        return "body must be a JSON object"
    if not isinstance(b.get("model"), str) or not b["model"]:
        return "model: Field required"
    if not isinstance(b.get("max_tokens"), int) or b["max_tokens"] < 1:
        return "max_tokens: Field required (a positive integer)"
    msgs = b.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages: at least one message is required"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or "content" not in m:
            return f"messages.{i}: each message needs a role (user|assistant) and content"
    breakpoints = 0
    system = b.get("system")
    if system is not None:
        if isinstance(system, list):
            for i, blk in enumerate(system):
                if not isinstance(blk, dict) or blk.get("type") != "text" or not isinstance(blk.get("text"), str):
                    return f"system.{i}: expected a text block"
                if "cache_control" in blk:
                    breakpoints += 1
                    err = _check_cache_control(blk["cache_control"], f"system.{i}")
                    if err:
                        return err
        elif not isinstance(system, str):
            return "system: expected a string or a list of text blocks"
    tools = b.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: expected a list"
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not _TOOL_NAME.match(t["name"]):
                return f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            schema = t.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type") != "object":
                return f"tools.{i}.input_schema: must be a JSON schema of type 'object'"
            if "cache_control" in t:
                breakpoints += 1
                err = _check_cache_control(t["cache_control"], f"tools.{i}")
                if err:
                    return err
            names.append(t["name"])
    if breakpoints > 4:
        return f"A maximum of 4 blocks with cache_control may be provided. Found {breakpoints}."
    tc = b.get("tool_choice")
    if tc is not None:
        if not isinstance(tc, dict) or tc.get("type") not in ("auto", "any", "tool", "none"):
            return "tool_choice.type: expected auto, any, tool or none"
        if tc["type"] == "tool" and tc.get("name") not in names:
            return f"tool_choice.name: tool {tc.get('name')!r} not found in tools"
    return None


def _strict_schema_error(schema: Any, where: str) -> str | None:
    """OpenAI's strict mode: every object closes (additionalProperties false) and requires all its keys."""
    if not isinstance(schema, dict):
        return f"{where}: schema must be an object"
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "object" in types:
        if schema.get("additionalProperties") is not False:
            return f"In context={where}, 'additionalProperties' is required to be supplied and to be false."
        props = schema.get("properties", {})
        if sorted(schema.get("required", [])) != sorted(props):
            missing = sorted(set(props) - set(schema.get("required", [])))
            return f"In context={where}, 'required' is required to be supplied and to be an array including every key in properties. Missing {missing}."
        for k, sub in props.items():
            err = _strict_schema_error(sub, f"{where}.properties.{k}")
            if err:
                return err
    if "array" in types and "items" in schema:
        return _strict_schema_error(schema["items"], f"{where}.items")
    for kw in ("minLength", "maxLength", "patternProperties", "unevaluatedProperties", "propertyNames"):
        if kw in schema:
            return f"In context={where}, '{kw}' is not permitted."
    return None


def _check_openai_chat(rec: Recorded) -> str | None:
    b = rec.body
    if not isinstance(b, dict):
        return "body must be a JSON object"
    if not isinstance(b.get("model"), str) or not b["model"]:
        return "you must provide a model parameter"
    msgs = b.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages: expected a non-empty array"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            return f"messages[{i}].role: invalid"
    rf = b.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            return "response_format.type: expected text, json_object or json_schema"
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("name"), str) or not _TOOL_NAME.match(js["name"]):
                return "response_format.json_schema.name: required, [a-zA-Z0-9_-]{1,64}"
            if js.get("strict") is True:
                err = _strict_schema_error(js.get("schema"), js["name"])
                if err:
                    return f"Invalid schema for response_format '{js['name']}': {err}"
    if "max_tokens" in b and "max_completion_tokens" in b:
        return "max_tokens and max_completion_tokens cannot both be set"
    return None


def _check_openai_embeddings(rec: Recorded) -> str | None:
    b = rec.body
    if not isinstance(b, dict):
        return "body must be a JSON object"
    if not isinstance(b.get("model"), str) or not b["model"]:
        return "you must provide a model parameter"
    inp = b.get("input")
    if isinstance(inp, str):
        inp = [inp]
    if not isinstance(inp, list) or not inp or len(inp) > 2048:
        return "input: expected 1 to 2048 inputs"
    if any(not isinstance(t, str) or not t for t in inp):
        return "input: '$.input' is invalid (an input is empty or not a string)"
    if "dimensions" in b and (not isinstance(b["dimensions"], int) or b["dimensions"] < 1):
        return "dimensions: expected a positive integer"
    if b.get("encoding_format", "float") not in ("float", "base64"):
        return "encoding_format: expected float or base64"
    return None


def _auth_failure(api: LoopbackAPI, path: str, why: str) -> Reply:
    if path == ANTHROPIC_MESSAGES:
        return Reply(401, anthropic_error("authentication_error", why, api.next_id("req_")))
    return Reply(401, openai_error("invalid_request_error", why, code="invalid_api_key"))


def _bad_request(api: LoopbackAPI, path: str, why: str) -> Reply:
    if path == ANTHROPIC_MESSAGES:
        return Reply(400, anthropic_error("invalid_request_error", why, api.next_id("req_")))
    return Reply(400, openai_error("invalid_request_error", why))


# --- response builders ------------------------------------------------------


def anthropic_error(kind: str, message: str, request_id: str = "req_000") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}


def openai_error(kind: str, message: str, *, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def anthropic_usage(input_tokens: int = 120, output_tokens: int = 40, cache_read: int = 0,
                    cache_creation: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_creation,
        "service_tier": "standard",
    }


def anthropic_message(content: list[dict[str, Any]], *, stop_reason: str = "end_turn",
                      model: str = "claude-haiku-4-5", usage: dict[str, Any] | None = None,
                      msg_id: str = "msg_01XFDUDYJgAACzvnptvVoYEL") -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage if usage is not None else anthropic_usage(),
    }


def anthropic_tool_message(name: str, tool_input: Any, **kw: Any) -> dict[str, Any]:
    block = {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": name, "input": tool_input}
    return anthropic_message([block], stop_reason=kw.pop("stop_reason", "tool_use"), **kw)


def anthropic_text_message(text: str, **kw: Any) -> dict[str, Any]:
    return anthropic_message([{"type": "text", "text": text}], **kw)


def openai_chat(content: str | None, *, finish_reason: str = "stop", refusal: str | None = None,
                model: str = "gpt-4.1-mini", prompt_tokens: int = 150, completion_tokens: int = 30,
                cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1_763_900_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal, "annotations": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_loopback",
    }


def text_vector(text: str, dim: int) -> np.ndarray:
    """A deterministic, not normalised, float32 vector for ``text`` (so tests can check order)."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return (np.random.default_rng(seed).standard_normal(dim) * 3.0).astype(np.float32)


def openai_embeddings(vectors: Iterable[np.ndarray], *, encoding_format: str = "float",
                      order: list[int] | None = None, labels: list[int] | None = None,
                      model: str = "text-embedding-3-small", prompt_tokens: int = 10) -> dict[str, Any]:
    """An embeddings response listing ``vectors[i]`` for i in ``order`` (default: input order).

    Each entry's ``index`` is its input position, or ``labels[k]`` for the k-th entry listed
    (to forge repeated or out-of-range indices).
    """
    vecs = [np.asarray(v, dtype=np.float32) for v in vectors]
    idx = list(range(len(vecs))) if order is None else order
    data = []
    for k, i in enumerate(idx):
        v = vecs[i]
        emb: Any = base64.b64encode(v.tobytes()).decode() if encoding_format == "base64" else [float(x) for x in v]
        data.append({"object": "embedding", "index": i if labels is None else labels[k], "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def embeddings_responder(dim: int | None = None, *, reverse: bool = False) -> Callable[[Recorded], Reply]:
    """Answers any embeddings request with :func:`text_vector` of each input, in the requested format.

    ``dim`` defaults to the request's ``dimensions`` (else 1536). ``reverse`` lists the
    vectors in reverse order (each still tagged with its ``index``), as the API may.
    """

    def respond(rec: Recorded) -> Reply:
        texts = rec.body["input"] if isinstance(rec.body["input"], list) else [rec.body["input"]]
        d = dim if dim is not None else int(rec.body.get("dimensions", 1536))
        order = list(range(len(texts)))[::-1] if reverse else None
        body = openai_embeddings([text_vector(t, d) for t in texts], order=order,
                                 encoding_format=rec.body.get("encoding_format", "float"),
                                 prompt_tokens=sum(len(t.split()) for t in texts))
        return Reply(200, body)

    return respond
