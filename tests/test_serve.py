"""sqlgpt serve, driven live on 127.0.0.1 by the official `openai` client
(sync and async, streaming and not), by raw HTTP for the SSE framing and the
error bodies, and by a headless browser for the chat page: answers equal the
Python API's, continuous batching changes no answer, cancelled streams free
their slots, bad requests are OpenAI error objects and the server serves
on, and Ctrl-C drains."""
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

import sqlgpt
from sqlgpt.cli import main

from conftest import CORPUS
from helpers import tiny_chat_models

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "sk-test-key"
TALK = [{"role": "user", "content": "Reverse: one two"}]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def chat_db(tmp_path_factory):
    return tiny_chat_models(tmp_path_factory.mktemp("serve"), CORPUS.read_text()[:40000],
                            (("one", "two"), ("red", "blue"), ("cat", "dog")), 20, 30, 30)[1]


class Live:
    """A `sqlgpt serve` process and its address."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from sqlgpt.cli import main; main()", "serve", "--port", "0",
             *map(str, args)], stderr=subprocess.PIPE, text=True,
            cwd=os.path.dirname(str(args[1])))
        self.log = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if line.startswith("serving"):
                self.url = line.split(" at ")[1].split("/v1")[0]
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.proc.kill()
        raise AssertionError("the server did not start: " + "".join(self.log))

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def client(self, cls=None, key=KEY):
        return (cls or openai.OpenAI)(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def http(self, method, path, key=KEY, **kwargs):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def metric(self, name):
        text = self.http("GET", "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name))

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def live(chat_db):
    server = Live("--db", chat_db, "--slots", "4", "--api-key", KEY)
    yield server
    assert server.stop() == 0, "".join(server.log)


def test_models_chat_and_completions_as_the_python_api_gives_them(live, chat_db):
    model = sqlgpt.load(chat_db)
    client = live.client()
    assert [m.id for m in client.models.list().data] == ["talk"]
    reply = client.chat.completions.create(model="talk", messages=TALK, temperature=0,
                                           max_tokens=12)
    want = model.chat(TALK, temperature=0, max_tokens=12)
    assert want and reply.choices[0].message.content == want
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(model.chat_prompt(TALK))
    streamed = client.chat.completions.create(model="talk", messages=TALK, temperature=0,
                                              max_tokens=12, stream=True,
                                              stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        reply.usage.completion_tokens
    # seeded samples: choice i is what Model.generate gives with seed + i
    done = client.completions.create(model="talk", prompt="the king", max_tokens=10, seed=5,
                                     n=2, temperature=0.9)
    for i, choice in enumerate(done.choices):
        full = model.generate("the king", max_tokens=10, temperature=0.9, seed=5 + i)
        assert choice.index == i and "the king" + choice.text == full
    stopped = client.completions.create(model="talk", prompt=["the", "a"], max_tokens=30,
                                        temperature=0, stop=["e"])
    assert len(stopped.choices) == 2 and all("e" not in c.text for c in stopped.choices)


def test_echo_gives_the_prompts_logprobs(live, chat_db):
    model = sqlgpt.load(chat_db)
    out = live.client().completions.create(model="talk", prompt="the king is", max_tokens=0,
                                           echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text == "the king is"
    ids = model.encode("the king is")
    logits = model.logits(ids).astype(np.float64)
    want = [float(logits[i - 1, ids[i]] - np.log(np.exp(logits[i - 1]).sum()))
            for i in range(1, len(ids))]
    assert choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], want, rtol=1e-5)
    assert len(choice.logprobs.top_logprobs[1]) == 2


def test_chat_logprobs(live):
    out = live.client().chat.completions.create(model="talk", messages=TALK, temperature=0,
                                                max_tokens=4, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy: the top
        assert item.logprob <= 0


def test_concurrent_requests_get_what_they_get_alone(live, chat_db):
    """Continuous batching: 8 requests at once through the async client,
    each greedy or seeded, equal to the same requests one at a time."""
    prompts = [f"the {w}" for w in ("king", "queen", "lord", "lady", "duke", "man", "day",
                                    "night")]

    async def ask(client, i, prompt):
        r = await client.completions.create(model="talk", prompt=prompt, max_tokens=12 + i,
                                            temperature=0 if i % 2 else 0.8, seed=i)
        return r.choices[0].text

    async def together():
        client = live.client(openai.AsyncOpenAI)
        return await asyncio.gather(*(ask(client, i, p) for i, p in enumerate(prompts)))
    at_once = asyncio.run(together())

    async def alone():
        client = live.client(openai.AsyncOpenAI)
        return [await ask(client, i, p) for i, p in enumerate(prompts)]
    assert at_once == asyncio.run(alone())


def test_embeddings_as_floats_and_base64(live, chat_db):
    model = sqlgpt.load(chat_db)
    client = live.client()
    out = client.embeddings.create(model="talk", input=["the king", "a dog"])  # base64 wire
    assert len(out.data) == 2 and out.usage.prompt_tokens == sum(
        len(model.encode(t)) for t in ("the king", "a dog"))
    np.testing.assert_allclose(out.data[0].embedding, model.embed("the king"), rtol=1e-6)
    floats = live.http("POST", "/v1/embeddings", json={"model": "talk", "input": "a dog",
                                                        "encoding_format": "float"}).json()
    np.testing.assert_allclose(floats["data"][0]["embedding"], model.embed("a dog"), rtol=1e-6)
    raw = live.http("POST", "/v1/embeddings", json={"model": "talk", "input": [[5, 6, 7]],
                                                     "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, model.embed_ids([5, 6, 7]), rtol=1e-6)


def test_the_sse_framing(live):
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "talk", "messages": TALK, "stream": True,
                            "max_tokens": 5, "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


BAD = [
    ("POST", "/v1/chat/completions", b"{not json", 400, "not JSON"),
    ("POST", "/v1/chat/completions", {"model": "talk", "messages": TALK, "max_tokens": -1},
     400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "talk", "messages": TALK,
                                      "max_tokens": 10**12}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": TALK}, 404, "nope"),
    ("POST", "/v1/chat/completions", {"model": "talk", "messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "talk", "messages": TALK, "temperature": "hot"},
     400, "temperature"),
    ("POST", "/v1/completions", {"model": "talk", "prompt": "x" * 5000}, 400, "context"),
    ("POST", "/v1/completions", {"model": "talk", "prompt": [10**9]}, 400, "token ids"),
    ("POST", "/v1/completions", {"model": "talk", "prompt": "x", "stop": ["a"] * 9}, 400,
     "stop"),
    ("POST", "/v1/embeddings", {"model": "talk", "input": 5}, 400, "input"),
    ("POST", "/v1/completions", b"x" * (9 << 20), 413, "over"),
]


@pytest.mark.parametrize("method,path,body,status,text", BAD)
def test_bad_requests_are_openai_error_objects(live, method, path, body, status, text):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = live.http(method, path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert text in error["message"] and error["type"]
    assert live.http("GET", "/health").json() == {"status": "ok"}  # and it serves on


def test_keys_are_checked(live):
    assert live.http("GET", "/v1/models", key=None).status_code == 401
    assert live.http("GET", "/v1/models", key="wrong").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").models.list()
    assert live.http("GET", "/health", key=None).status_code == 200


def test_tokenize_detokenize_and_metrics(live, chat_db):
    model = sqlgpt.load(chat_db)
    ids = live.http("POST", "/tokenize", json={"content": "the king"}).json()["tokens"]
    assert ids == [int(i) for i in model.encode("the king")]
    assert live.http("POST", "/detokenize", json={"tokens": ids}).json()["content"] == \
        "the king"
    text = live.http("GET", "/metrics").text
    for name in ("sqlgpt_requests_total", "sqlgpt_prompt_tokens_total",
                 "sqlgpt_generated_tokens_total", "sqlgpt_time_to_first_token_seconds_count",
                 "sqlgpt_slots_busy", "sqlgpt_queue_length"):
        assert f"# TYPE {name.removesuffix('_count')}" in text and name in text


def test_a_cancelled_stream_frees_its_slot(live):
    client = live.client()
    for _ in range(3):
        stream = client.completions.create(model="talk", prompt="the", max_tokens=100,
                                           temperature=1.0, stream=True)
        next(iter(stream))
        stream.close()
    deadline = time.monotonic() + 10
    while live.metric("sqlgpt_slots_busy") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.metric("sqlgpt_slots_busy") == 0 and live.metric("sqlgpt_queue_length") == 0


@pytest.fixture(scope="module")
def long_db(chat_db):
    """A model with a long context, whose requests run long enough to overlap."""
    db = chat_db.parent / "long.db"
    assert run("train", chat_db.parent / "corpus.txt", "--db", db, "--preset", "gpt2",
               "--embed-dim", "64", "--heads", "4", "--layers", "2", "--seq-len", "2048",
               "--vocab-size", "300", "--iters", "1", "--batch-size", "1").exit_code == 0
    return db


def test_a_full_queue_is_429_and_ctrl_c_drains(long_db):
    server = Live("--db", long_db, "--slots", "1", "--queue", "1")
    try:
        def ask():
            return server.http("POST", "/v1/completions", key=None,
                               json={"prompt": "the", "max_tokens": 2000, "temperature": 1,
                                     "ignore_eos": True})
        results, start = [], threading.Barrier(8)

        def one():
            start.wait()
            results.append(ask())
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r.status_code for r in results)
        assert 429 in statuses and 200 in statuses, statuses
        assert [r.json()["error"]["type"] for r in results if r.status_code == 429][0] == \
            "rate_limit_error"
        # a request in flight when Ctrl-C comes is answered whole, then the server exits
        answer = []
        t = threading.Thread(target=lambda: answer.append(ask()))
        t.start()
        time.sleep(0.3)
    finally:
        code = server.stop()
    t.join()
    assert code == 0 and answer and answer[0].status_code == 200
    assert answer[0].json()["choices"][0]["finish_reason"] in ("length", "stop")


def browser():
    """Headless Chromium through chromedriver, both from the system (nothing
    downloads a browser), or a skip where they are missing."""
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no chromium and chromedriver here (apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1100,700"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service
    # the browser is not ours to sanitize (CI preloads the sanitizers for sqlgpt's kernel)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS",
                                                            "UBSAN_OPTIONS")}
    return webdriver.Chrome(service=Service(driver_path, env=env), options=options)


def test_the_chat_page_in_a_real_browser(chat_db, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    server = Live("--db", chat_db, "--slots", "2")
    driver = None
    try:
        driver = browser()
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == "talk")
        for field, value in (("temperature", "0"), ("max_tokens", "12")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "text").send_keys("Reverse: one two")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "log").get_attribute("data-turns") == "1")
        reply = driver.find_element(By.CSS_SELECTOR, ".assistant span")
        want = sqlgpt.load(chat_db).chat(TALK, temperature=0, max_tokens=12)
        assert reply.text == want.strip() and want.strip()
        assert "user: Reverse: one two" in driver.find_element(By.ID, "log").text
        driver.save_screenshot(str(tmp_path / "page.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        if driver is not None:
            driver.quit()
        assert server.stop() == 0
