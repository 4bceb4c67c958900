"""`sqlgpt serve`: models over HTTP in OpenAI's dialect, on Starlette (an
ASGI toolkit small enough to read, with streaming responses and CORS) run
by uvicorn.

Each model has one Scheduler (continuous batching, scheduler.py); the
handlers only check requests, hand jobs to it and turn what it delivers into
OpenAI's objects, streamed as server-sent events where asked. A client that
goes away cancels its jobs, which leave the batch at the next step.
"""
import asyncio
import contextlib
import json
import os
from pathlib import Path

import numpy as np

from ..chat.template import check_messages
from ..errors import SqlgptError
from ..inference.beam import log_softmax
from . import protocol
from .metrics import Metrics
from .protocol import ApiError, bad
from .scheduler import Job, QueueFull, Scheduler

PAGE = Path(__file__).with_name("page.html")
COMPLETION_MAX_TOKENS = 16    # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 512         # and a chat reply's, when the request names none


class Served:
    """One model, by the name requests give it, and its scheduler."""

    def __init__(self, name, model, slots, queue_limit, metrics):
        self.name, self.model = name, model
        self.scheduler = Scheduler(model, slots, queue_limit, metrics)


class Server:
    """The ASGI app over some loaded models ({name: Model})."""

    def __init__(self, models, slots=4, api_key=None, cors_origins=(), webui=True,
                 queue_limit=64, max_body_bytes=8 << 20):
        self.metrics = Metrics()
        self.served = {name: Served(name, m, slots, queue_limit, self.metrics)
                       for name, m in models.items()}
        self.api_key, self.webui, self.max_body = api_key, webui, max_body_bytes
        self.cors_origins = list(cors_origins)
        self.created = protocol.now()

    def app(self):
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        from starlette.routing import Route
        routes = [Route("/health", self.health), Route("/metrics", self.prometheus),
                  Route("/v1/models", self.list_models),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                  Route("/tokenize", self.tokenize, methods=["POST"]),
                  Route("/detokenize", self.detokenize, methods=["POST"])]
        if self.webui:
            routes.append(Route("/", self.page))
        middleware = [Middleware(CORSMiddleware, allow_origins=self.cors_origins,
                                 allow_methods=["*"], allow_headers=["*"])] \
            if self.cors_origins else []

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            self.close()
        return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)

    def close(self):
        for served in self.served.values():
            served.scheduler.stop()

    # ---- plumbing: errors, auth, bodies ----
    async def _handle(self, request, handler, authorized=True):
        from starlette.responses import JSONResponse
        status = 200
        try:
            if authorized:
                self._authorize(request)
            return await handler(request)
        except ApiError as e:
            status = e.status
            return JSONResponse(e.body(), status_code=e.status)
        except QueueFull as e:
            status = 429
            return JSONResponse(ApiError(429, str(e), "rate_limit_error").body(), 429)
        except SqlgptError as e:
            status = 400
            return JSONResponse(bad(None, str(e)).body(), status_code=400)
        except MemoryError:
            status = 503
            return JSONResponse(ApiError(503, "out of memory", "server_error").body(), 503)
        finally:
            self.metrics.request(request.url.path, status)

    def _authorize(self, request):
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                           "invalid_request_error", code="invalid_api_key")

    async def _body(self, request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"the request body is over {self.max_body:,} bytes")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body:
                raise ApiError(413, f"the request body is over {self.max_body:,} bytes")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            raise bad(None, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise bad(None, "the request body must be a JSON object")
        return body

    def _model(self, body):
        name = body.get("model")
        if name is None and len(self.served) == 1:
            return next(iter(self.served.values()))
        if not isinstance(name, str) or name not in self.served:
            raise ApiError(404, f"The model {name!r} does not exist (served: "
                                f"{', '.join(self.served)})", param="model",
                           code="model_not_found")
        return self.served[name]

    # ---- routes ----
    async def health(self, request):
        from starlette.responses import JSONResponse
        return await self._handle(request, lambda r: _done(JSONResponse({"status": "ok"})),
                                  authorized=False)

    async def page(self, request):
        from starlette.responses import HTMLResponse
        return await self._handle(request, lambda r: _done(HTMLResponse(PAGE.read_text())),
                                  authorized=False)

    async def prometheus(self, request):
        from starlette.responses import PlainTextResponse

        async def text(_):
            return PlainTextResponse(self.metrics.text(self.served),
                                     media_type="text/plain; version=0.0.4")
        return await self._handle(request, text)

    async def list_models(self, request):
        from starlette.responses import JSONResponse

        async def listing(_):
            return JSONResponse({"object": "list", "data": [
                {"id": name, "object": "model", "created": self.created, "owned_by": "sqlgpt"}
                for name in self.served]})
        return await self._handle(request, listing)

    async def tokenize(self, request):
        from starlette.responses import JSONResponse

        async def run(_):
            body = await self._body(request)
            served = self._model(body)
            content = body.get("content")
            if not isinstance(content, str):
                raise bad("content", "content must be text")
            ids = [int(i) for i in served.model.encode(content)]
            return JSONResponse({"tokens": ids})
        return await self._handle(request, run)

    async def detokenize(self, request):
        from starlette.responses import JSONResponse

        async def run(_):
            body = await self._body(request)
            served = self._model(body)
            tokens = body.get("tokens")
            if not (isinstance(tokens, list) and all(protocol._is_id(t) for t in tokens)):
                raise bad("tokens", "tokens must be a list of token ids")
            protocol._ids(tokens, "tokens", served.model.arch.n_vocab)
            return JSONResponse({"content": served.model.decode(tokens)})
        return await self._handle(request, run)

    async def embeddings(self, request):
        from starlette.responses import JSONResponse

        async def run(_):
            body = await self._body(request)
            served = self._model(body)
            model = served.model
            items = protocol.texts_or_ids(body.get("input"), "input", model.arch.n_vocab)
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise bad("encoding_format", "encoding_format must be float or base64")
            ids = [model.encode(i) if isinstance(i, str) else np.asarray(i, np.int32)
                   for i in items]
            if any(len(i) == 0 for i in ids):
                raise bad("input", "an input has no tokens")
            vectors = await asyncio.wrap_future(served.scheduler.call(
                lambda: [model.embed_ids(i) for i in ids]))
            count = sum(len(i) for i in ids)
            self.metrics.tokens(count, 0)
            return JSONResponse({"object": "list", "model": served.name, "data": [
                {"object": "embedding", "index": k,
                 "embedding": protocol.embedding_value(v, encoding)}
                for k, v in enumerate(vectors)], "usage": {"prompt_tokens": count,
                                                           "total_tokens": count}})
        return await self._handle(request, run)

    async def completions(self, request):
        return await self._handle(request, self._completions)

    async def chat_completions(self, request):
        return await self._handle(request, self._chat_completions)

    async def _completions(self, request):
        body = await self._body(request)
        served = self._model(body)
        model = served.model
        prompts = protocol.texts_or_ids(body.get("prompt", ""), "prompt", model.arch.n_vocab)
        sampler, max_tokens, seed, stop, n = protocol.sampling(body, COMPLETION_MAX_TOKENS)
        echo, stream = protocol.flag(body, "echo"), protocol.flag(body, "stream")
        logprobs = protocol._integer(body, "logprobs", None, 0, 5)
        ids = [self._prompt_ids(model, p) for p in prompts]
        runs = [Run(i * n + j, p, ids[i]) for i, p in enumerate(prompts) for j in range(n)]
        # ignore_eos (vLLM's and llama.cpp's extension): run to max_tokens, for benchmarks
        end = None if protocol.flag(body, "ignore_eos") else model.tokenizer.eos_id
        spec = dict(sampler=sampler, max_tokens=max_tokens, seed=seed, stop=stop,
                    end_id=end, top=logprobs, banned=model._banned(False))
        if stream:
            if echo and max_tokens == 0 and logprobs is not None:
                raise bad("stream", "echo with logprobs and max_tokens 0 is not streamed")
            return self._sse(served, runs, spec, protocol.include_usage(body),
                             lambda run, piece, reason: _completion_chunk(
                                 run, piece, reason, served, model, logprobs))
        await self._generate(served, runs, spec)
        echoed = {}
        if echo and logprobs is not None:
            scores = await asyncio.wrap_future(served.scheduler.call(
                lambda: [prompt_scores(model, i, logprobs) for i in ids]))
            echoed = dict(enumerate(scores))
        choices = [{"index": r.index, "text": (model.decode(r.prompt_ids) if echo else "") +
                    r.text, "finish_reason": r.reason,
                    "logprobs": None if logprobs is None else completion_logprobs(
                        model, r, echoed.get(r.index // n), echo)} for r in runs]
        return _json({"id": protocol.new_id("cmpl"), "object": "text_completion",
                      "created": protocol.now(), "model": served.name, "choices": choices,
                      "usage": protocol.usage(sum(len(i) for i in ids) * n,
                                              sum(r.tokens for r in runs))})

    async def _chat_completions(self, request):
        body = await self._body(request)
        served = self._model(body)
        model = served.model
        try:
            messages = check_messages(protocol.messages_of(body))
        except SqlgptError as e:
            raise bad("messages", str(e)) from None
        sampler, max_tokens, seed, stop, n = protocol.sampling(body, CHAT_MAX_TOKENS)
        stream = protocol.flag(body, "stream")
        top = protocol._integer(body, "top_logprobs", None, 0, protocol.MAX_TOP_LOGPROBS)
        if top is not None and not protocol.flag(body, "logprobs"):
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        if protocol.flag(body, "logprobs"):
            top = top or 0
        chat = model.chat_format()
        prompt = chat.prompt(messages)
        if len(prompt) >= model.context:
            raise ApiError(400, f"the conversation is {len(prompt)} tokens; the model's context "
                                f"is {model.context}", param="messages",
                           code="context_length_exceeded")
        runs = [Run(j, "", [int(i) for i in prompt]) for j in range(n)]
        spec = dict(sampler=sampler, max_tokens=max_tokens, seed=seed, stop=stop,
                    end_id=chat.end_id, top=top, banned=model._banned(False))
        if stream:
            return self._sse(served, runs, spec, protocol.include_usage(body),
                             lambda run, piece, reason: _chat_chunk(run, piece, reason, served,
                                                                    model, top))
        await self._generate(served, runs, spec)
        choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.reason,
                    "logprobs": None if top is None else chat_logprobs(model, r)}
                   for r in runs]
        return _json({"id": protocol.new_id("chatcmpl"), "object": "chat.completion",
                      "created": protocol.now(), "model": served.name, "choices": choices,
                      "usage": protocol.usage(len(prompt) * n, sum(r.tokens for r in runs))})

    def _prompt_ids(self, model, prompt):
        """A prompt's ids (text, as Model.prompt_ids makes them; or ids),
        refused when it leaves no room in the context."""
        if isinstance(prompt, str):
            ids = model.encode(prompt) if prompt else model.prompt_ids("")
            if prompt and not len(ids):
                raise bad("prompt", "the prompt has no tokens")
        else:
            ids = prompt
        if len(ids) >= model.context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; the model's context is "
                                f"{model.context}", param="prompt",
                           code="context_length_exceeded")
        return [int(i) for i in ids]

    # ---- running jobs ----
    def _jobs(self, served, runs, spec, events):
        loop = asyncio.get_running_loop()
        jobs = []
        for run in runs:
            def deliver(kind, value, run=run):
                loop.call_soon_threadsafe(events.put_nowait, (run, kind, value))
            seed = None if spec["seed"] is None else (spec["seed"] + run.index) % 2**63
            room = served.model.context - len(run.prompt_ids)
            jobs.append(Job(run.prompt_ids, min(spec["max_tokens"], room), spec["sampler"], seed,
                            spec["end_id"], spec["stop"], deliver,
                            -1 if spec["top"] is None else spec["top"], spec["banned"]))
        return jobs

    async def _events(self, served, runs, spec):
        """Yield (run, kind, value) as the runs' jobs deliver, until all are
        done; the jobs are cancelled if the consumer stops early."""
        events = asyncio.Queue()
        jobs = self._jobs(served, runs, spec, events)
        pending = set(range(len(jobs)))
        if spec["max_tokens"] == 0:
            for run in runs:
                run.reason = "length"
                yield run, "done", "length"
            return
        try:
            for job in jobs:
                served.scheduler.submit(job)
            self.metrics.tokens(sum(len(r.prompt_ids) for r in runs), 0)
            while pending:
                run, kind, value = await events.get()
                if kind == "piece":
                    run.add(value)
                    self.metrics.tokens(0, 1 if value.token >= 0 else 0)
                elif kind == "done":
                    run.reason = value
                    pending.discard(runs.index(run))
                else:
                    raise ApiError(500, value, "server_error")
                yield run, kind, value
        finally:
            for job in jobs:
                served.scheduler.cancel(job)

    async def _generate(self, served, runs, spec):
        async for _ in self._events(served, runs, spec):
            pass

    def _sse(self, served, runs, spec, with_usage, chunk):
        from starlette.responses import StreamingResponse
        # checked now, so that a full queue is a 429 and not a broken stream
        if served.scheduler.waiting() + len(runs) > served.scheduler.queue_limit:
            raise QueueFull("too many requests are waiting; try again soon")

        async def stream():
            first = {}
            try:
                async for run, kind, value in self._events(served, runs, spec):
                    if run.index not in first:
                        first[run.index] = True
                        opening = chunk(run, None, None)
                        if opening:
                            yield _event(opening)
                    if kind == "piece":
                        yield _event(chunk(run, value, None))
                    elif kind == "done":
                        yield _event(chunk(run, None, value))
                if with_usage:
                    last = chunk(runs[0], None, "usage")
                    last["choices"] = []
                    last["usage"] = protocol.usage(sum(len(r.prompt_ids) for r in runs),
                                                   sum(r.tokens for r in runs))
                    yield _event(last)
            except ApiError as e:
                yield _event(e.body())
            except SqlgptError as e:  # a queue that filled since the check
                yield _event(ApiError(429 if isinstance(e, QueueFull) else 400, str(e)).body())
            yield "data: [DONE]\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


class Run:
    """One choice of a request: its prompt, what it generated so far."""

    def __init__(self, index, prompt, prompt_ids):
        self.index, self.prompt, self.prompt_ids = index, prompt, prompt_ids
        self.text, self.tokens, self.reason, self.pieces = "", 0, None, []

    def add(self, piece):
        self.text += piece.text
        if piece.token >= 0:
            self.tokens += 1
            self.pieces.append(piece)


# ---- OpenAI's objects ----

def _json(body):
    from starlette.responses import JSONResponse
    return JSONResponse(body)


async def _done(value):
    return value


def _event(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def token_text(model, token):
    return model.tokenizer.token_bytes(token).decode("utf-8", "replace")


def prompt_scores(model, ids, top):
    """(token, logprob or None, [(id, logprob)]) for each prompt id, from
    the float32 forward (the first token has no logprob, as OpenAI's echo)."""
    logits = model.logits(ids)
    out = [(ids[0], None, [])]
    for i in range(1, len(ids)):
        lp = log_softmax(logits[i - 1])
        best = np.argsort(-lp, kind="stable")[:top]
        out.append((ids[i], float(lp[ids[i]]), [(int(b), float(lp[b])) for b in best]))
    return out


def completion_logprobs(model, run, echoed, echo):
    """/v1/completions' logprobs object: tokens, token_logprobs,
    top_logprobs and text_offset (the prompt's first where echoed)."""
    rows = (echoed or []) + [(p.token, p.logprob, p.top) for p in run.pieces]
    tokens, offsets, at = [], [], 0
    for token, _, _ in rows:
        text = token_text(model, token)
        tokens.append(text)
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [None if lp is None else {token_text(model, i): v for i, v in top}
                             for _, lp, top in rows],
            "text_offset": offsets}


def _chat_token(model, token, logprob):
    raw = model.tokenizer.token_bytes(token)
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(model, run_or_pieces):
    pieces = run_or_pieces.pieces if isinstance(run_or_pieces, Run) else run_or_pieces
    return {"content": [{**_chat_token(model, p.token, p.logprob),
                         "top_logprobs": [_chat_token(model, i, v) for i, v in p.top]}
                        for p in pieces if p.token >= 0]}


def _chat_chunk(run, piece, reason, served, model, top):
    base = {"id": f"chatcmpl-{id(run):x}", "object": "chat.completion.chunk",
            "created": protocol.now(), "model": served.name}
    if reason == "usage":
        return base
    if piece is None and reason is None:  # the opening chunk: the role
        return {**base, "choices": [{"index": run.index, "delta": {"role": "assistant",
                                                                     "content": ""},
                                     "logprobs": None, "finish_reason": None}]}
    if piece is not None:
        logprobs = chat_logprobs(model, [piece]) if top is not None and piece.token >= 0 \
            else None
        return {**base, "choices": [{"index": run.index, "delta": {"content": piece.text},
                                     "logprobs": logprobs, "finish_reason": None}]}
    return {**base, "choices": [{"index": run.index, "delta": {}, "logprobs": None,
                                 "finish_reason": reason}]}


def _completion_chunk(run, piece, reason, served, model, logprobs):
    base = {"id": f"cmpl-{id(run):x}", "object": "text_completion", "created": protocol.now(),
            "model": served.name}
    if reason == "usage" or (piece is None and reason is None):
        return base if reason == "usage" else None
    if piece is not None:
        lp = None
        if logprobs is not None and piece.token >= 0:
            lp = {"tokens": [token_text(model, piece.token)], "token_logprobs": [piece.logprob],
                  "top_logprobs": [{token_text(model, i): v for i, v in piece.top}],
                  "text_offset": [len(run.text) - len(piece.text)]}
        return {**base, "choices": [{"index": run.index, "text": piece.text, "logprobs": lp,
                                     "finish_reason": None}]}
    return {**base, "choices": [{"index": run.index, "text": "", "logprobs": None,
                                 "finish_reason": reason}]}


def serve(models, host="127.0.0.1", port=8000, on_ready=None, **options):
    """Run the server until interrupted (Ctrl-C drains and exits)."""
    import sys
    import uvicorn
    sys.setswitchinterval(float(os.environ.get("SQLGPT_SWITCH", "0.005")))
    server = Server(models, **options)
    config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=30, access_log=False)
    runner = uvicorn.Server(config)
    if on_ready:
        original = runner.startup

        async def startup(sockets=None):
            await original(sockets)
            on_ready(runner)
        runner.startup = startup
    try:
        runner.run()  # Ctrl-C: stop accepting, finish the requests in flight, return
    except KeyboardInterrupt:  # uvicorn raises the signal again once it has drained
        pass
    finally:
        server.close()
    return os.EX_OK
