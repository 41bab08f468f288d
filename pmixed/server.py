"""``pmixed serve``: one deployment behind an OpenAI-style HTTP API (FastAPI + uvicorn).

Endpoints:

* ``POST /v1/completions`` with ``prompt``, ``max_tokens``, ``temperature``, ``top_k``: the
  completion, OpenAI's ``text_completion`` shape plus a ``pmixed`` block (private and public-model
  tokens, prompt truncation). Bad input: 400 with a one-line reason naming the field
  (:class:`~pmixed.deployment.InvalidRequest`), checked before anything is charged. Budget spent
  with ``on_exhausted="refuse"``: 429 when no token could be released (``finish_reason:
  "budget"`` when some were).
* ``GET /v1/budget``: epsilon spent, the budget and what remains, δ, queries charged.
* ``GET /healthz``.

Concurrency: requests wait in a queue; one worker thread owns the generator and serves every
waiting request with the same sampling parameters in one :meth:`PrivateGenerator.generate` call
(all prompts advance together, one forward per step), so one ledger and one budget cover the whole
deployment. The generator runs with ``constant_work`` by default: every member is computed at
every step, so a step's forward rows do not reveal the sampled subset (the mollifier's work still
grows with the number of sampled members: not yet constant).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from pmixed.deployment import InvalidRequest, check_prompt, check_sampling
from pmixed.generator import Generation, PrivateGenerator

__all__ = ["CompletionRequest", "create_app", "serve_in_thread"]

#: How long the worker waits for more requests to join a batch once one has arrived (seconds).
BATCH_WINDOW_S = 0.01


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions`` (OpenAI's fields that PMixED serves)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    truncate_prompt: bool = False
    model: str | None = None


@dataclass
class Completion:
    """A validated request waiting for the worker."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    truncate: bool
    done: Future = field(default_factory=Future)


class _Worker:
    """The one thread that touches the generator and the deployment."""

    def __init__(self, generator: PrivateGenerator, max_batch: int) -> None:
        self.generator, self.max_batch = generator, max_batch
        self.lock = threading.Lock()  # the deployment's ledger: the worker or a budget read
        self.inbox: queue.Queue[Completion | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="pmixed-serve", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (first := self.inbox.get()) is not None:
            time.sleep(BATCH_WINDOW_S)
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.inbox.put(None)
                    break
                batch.append(item)
            groups: dict[tuple, list[Completion]] = {}
            for c in batch:
                groups.setdefault((c.max_tokens, c.temperature, c.top_k, c.truncate), []).append(c)
            for (n, temperature, top_k, truncate), items in groups.items():
                try:
                    with self.lock:
                        outs = self.generator.generate(
                            [c.prompt for c in items],
                            n,
                            temperature=temperature,
                            top_k=top_k,
                            truncate=truncate,
                        )
                except BaseException as exc:  # handed to every waiting request
                    for c in items:
                        c.done.set_exception(exc)
                    continue
                for c, out in zip(items, outs):
                    c.done.set_result(out)

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join()


def create_app(
    generator: PrivateGenerator, tokenizer, *, model_name: str = "pmixed", max_batch: int = 32
):
    """The FastAPI application serving ``generator``'s deployment (text in, text out)."""
    lm, deployment = generator.lm, generator.deployment
    worker: _Worker | None = None

    async def lifespan(app):
        nonlocal worker
        worker = _Worker(generator, max_batch)
        yield
        worker.stop()

    app = FastAPI(title="pmixed", lifespan=lifespan)

    def bad(exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error"}}, 400)

    @app.exception_handler(ValueError)
    async def _value_error(request, exc: ValueError):
        return bad(exc)

    @app.exception_handler(RequestValidationError)
    async def _unprocessable(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return bad(ValueError(f"{where or 'body'}: {first['msg']}"))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/budget")
    async def budget():
        def read():
            with worker.lock:
                return deployment.spent(), deployment.ledger.contents().n_queries

        spent, queries = await asyncio.to_thread(read)
        total = deployment.filter.budget.epsilon
        return {
            "epsilon_spent": spent.epsilon,
            "epsilon_budget": total,
            "epsilon_remaining": max(total - spent.epsilon, 0.0),
            "delta": deployment.filter.budget.delta,
            "queries": queries,
            "overrun": bool(spent.overrun),
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_sampling(req.temperature, req.top_k, lm.vocab_size)
        ids = tokenizer(req.prompt)["input_ids"]
        try:
            check_prompt(
                ids,
                vocab_size=lm.vocab_size,
                max_positions=lm.max_positions,
                new_tokens=req.max_tokens,
                truncate=req.truncate_prompt,
            )
        except InvalidRequest as err:  # the API's name for the field
            name = {"max_new_tokens": "max_tokens"}.get(err.param, err.param)
            raise InvalidRequest(name, err.rule, err.found) from None
        job = Completion(ids, req.max_tokens, req.temperature, req.top_k, req.truncate_prompt)
        worker.inbox.put(job)
        out: Generation = await asyncio.wrap_future(job.done)
        body = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model or model_name,
            "choices": [
                {
                    "index": 0,
                    "text": tokenizer.decode(list(out.tokens)),
                    "finish_reason": "budget" if out.refused else "length",
                }
            ],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(out.tokens),
                "total_tokens": len(ids) + len(out.tokens),
            },
            "pmixed": {
                "private_tokens": out.private_steps,
                "public_tokens": out.public_steps,
                "prompt_truncated": out.prompt_truncated,
            },
        }
        if out.refused and not out.tokens:
            body["error"] = {"message": "the privacy budget is spent", "type": "budget_exhausted"}
            return JSONResponse(body, 429)
        return body

    return app


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", *, start_timeout: float = 60.0):
    """uvicorn serving ``app`` on ``host`` and a free port, in a daemon thread; yields the base
    URL and stops the server on exit (tests and benchmarks; ``pmixed serve`` runs uvicorn itself)."""
    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server did not start within {start_timeout:g} s.")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
