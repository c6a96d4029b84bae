"""`ldm explore`: the JSON API against a server in this process, its guards tried as an attacker and as
a clumsy user, the command line, and the page in headless Chromium (typing and a slider over the
DevTools protocol, with a WebSocket client from the standard library)."""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from html.parser import HTMLParser

import pytest
import torch

import ldm
from ldm import cli, samplers
from ldm.explore import bind, request, stages

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no headless browser on PATH (chromium)")
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pipe():
    return ldm.load(ldm.weights.SHIPPED)


@pytest.fixture(scope="module")
def server(pipe):
    srv = bind("127.0.0.1", 0)
    srv.attach(pipe)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def call(server, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or bytes); default headers are a same-origin page's."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    hdrs = {"Host": f"127.0.0.1:{server.port}"}
    if method == "POST":
        hdrs |= {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{server.port}"}
    hdrs |= headers or {}
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in hdrs.items():
        if v is not None:
            conn.putheader(k, v)
    data = body.encode() if isinstance(body, str) else body
    if data is not None and "Content-Length" not in hdrs:
        conn.putheader("Content-Length", str(len(data)))
    conn.endheaders(data)
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    kind = r.getheader("Content-Type", "")
    return r.status, r, json.loads(raw) if kind.startswith("application/json") else raw


def generate(server, **fields):
    status, _, out = call(server, "POST", "/api/run", {"steps": 4, **fields})
    assert status == 200, out
    return out


# ---- the API: what each stage holds --------------------------------------------------------------
def test_info_names_the_model_samplers_layers_and_limits(server, pipe):
    status, r, info = call(server, "GET", "/api/info")
    assert status == 200 and info["model"] == "ldm-shapes" and info["size"] == 64
    assert info["samplers"] == list(samplers.SAMPLERS)
    assert [d["name"] for d in info["layers"]] == pipe.unet.attention_layers("cross")
    assert info["defaults"]["layer"] == "output_blocks.4.1.transformer_blocks.0.attn2"  # up, 8x8
    assert info["limits"]["steps"] == [1, 50] and info["x0_preview"] == "vae"


def test_tokens_and_ids_are_the_tokenizers(server, pipe):
    out = generate(server, prompt="A Red  circle, café!")
    tok = pipe.tokenizer
    ids = tok(["A Red  circle, café!"])[0].tolist()
    n = len(out["tokens"])
    assert [t["id"] for t in out["tokens"]] == ids[:n] and ids[n - 1] == tok.eos_id and ids[0] == tok.bos_id
    assert [t["piece"] for t in out["tokens"][1:-1]] == tok.tokenize("A Red  circle, café!")
    assert [t["text"] for t in out["tokens"]][1:4] == ["a", "red", "circle"]
    assert out["padding"] == 77 - n and out["dropped"] == ""
    sim = torch.tensor(out["similarity"])
    assert sim.shape == (n, n) and torch.allclose(sim.diagonal(), torch.ones(n), atol=2e-3)
    assert torch.allclose(sim, sim.T, atol=2e-3)


def test_a_long_prompt_reports_what_was_dropped(server):
    out = generate(server, prompt=" ".join(["red"] * 80) + " tail")
    assert len(out["tokens"]) == 77 and out["padding"] == 0 and out["dropped"].endswith("red red red red red tail")


def test_the_steps_slider_gives_that_many_frames_and_maps(server):
    for steps, B in ((1, 1), (7, 2)):
        out = generate(server, steps=steps, num_images=B, sampler="ddim")
        n = len(out["tokens"])
        assert len(out["steps"]) == steps and len(out["images"]) == B and out["seeds"] == [0, 1][:B]
        for s in out["steps"]:
            assert len(s["x0"]) == len(s["latent"]) == B and s["x0"][0].startswith("data:image/png;base64,")
            maps = torch.tensor(s["attention"])  # (B, n + 1, 8, 8): the tokens and the padding
            assert maps.shape == (B, n + 1, 8, 8)
            torch.testing.assert_close(maps.sum(1), torch.ones(B, 8, 8), atol=2e-3, rtol=0)  # softmax over 77
        assert out["steps"][0]["x0"][0] != out["steps"][-1]["x0"][0] or steps == 1


def test_the_maps_are_the_captures(server, pipe):
    """The attention in the answer is what ldm.capture records on the last step of the same run."""
    layer = "input_blocks.1.1.transformer_blocks.0.attn2"
    out = generate(server, steps=2, layer=layer, guidance=3.0)
    with pipe.unet.capture(attention=[layer]) as cap:
        pipe.generate(PROMPT, steps=2, guidance=3.0, seed=0, progress=False)
    n = len(out["tokens"])
    ours = cap.token_maps(layer)[1:, :, :n].mean(1)  # the prompt's half of [uncond; cond]
    torch.testing.assert_close(torch.tensor(out["steps"][-1]["attention"])[:, :n], ours, atol=1e-4, rtol=0)


def test_guidance_and_seed_change_the_image_and_the_same_settings_do_not(server):
    base = generate(server)["images"][0]
    assert generate(server)["images"][0] == base
    assert generate(server, seed=1)["images"][0] != base
    assert generate(server, guidance=1.0)["images"][0] != base
    assert generate(server, negative_prompt="red")["images"][0] != base
    assert generate(server, sampler="euler_a")["images"][0] != base


# ---- hostile and clumsy input -----------------------------------------------------------------------
@pytest.mark.parametrize("body, field, needle", [
    ({"steps": "20"}, "steps", "must be an integer in [1, 50]"),
    ({"steps": 0}, "steps", "is outside [1, 50]"),
    ({"steps": 51}, "steps", "is outside [1, 50]"),
    ({"steps": 2.5}, "steps", "must be an integer"),
    ({"steps": True}, "steps", "must be an integer"),
    ('{"guidance": NaN}', "guidance", "guidance=nan must be a finite number in [0.0, 30.0]"),
    ('{"guidance": -Infinity}', "guidance", "must be a finite number"),
    ({"guidance": 31}, "guidance", "is outside [0.0, 30.0]"),
    ({"guidance": "7.5"}, "guidance", "must be a finite number"),
    ({"seed": -1}, "seed", "is outside [0, 4294967295]"),
    ({"seed": 2**32}, "seed", "is outside"),
    ({"seed": 1e300}, "seed", "is outside"),
    ({"seed": None}, "seed", "must be an integer"),
    ({"sampler": "dpm++"}, "sampler", "allowed: ddim, ddpm, pndm, euler"),
    ({"sampler": ["euler"]}, "sampler", "is not a sampler"),
    ({"num_images": 5}, "num_images", "is outside [1, 4]"),
    ({"prompt": "x" * 1001}, "prompt", "is 1001 characters; at most 1000"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"negative_prompt": {"a": 1}}, "negative_prompt", "must be a string"),
    ({"layer": "../../etc/passwd"}, "layer", "is not a cross-attention layer"),
    ({"layer": "input_blocks.1.1.transformer_blocks.0.attn1"}, "layer", "is not a cross-attention layer"),
    ({"width": 4096}, "width", "is not a field; allowed: prompt"),
    ([1, 2], "body", "must be a JSON object"),
    ("not json", "body", "is not JSON"),
    (b"{\"prompt\": \"\xff\xfe\"}", "body", "is not JSON"),
    ("[" * 8000 + "]" * 8000, "body", None),  # deeper than the parser recurses
])
def test_bad_input_is_400_naming_the_field_value_and_what_is_allowed(server, body, field, needle):
    status, _, out = call(server, "POST", "/api/run", body)
    assert status == 400 and out["field"] == field, out
    assert needle is None or needle in out["error"], out["error"]
    assert "\n" not in out["error"] and len(out["error"]) < 1000


def test_the_librarys_own_checks_come_back_as_400_in_the_pages_names(server, monkeypatch):
    """ldm.options.check runs inside the pipeline too; its one-line ValueError is a 400, not a 500."""
    def refuse(*a, **k):
        raise ValueError("scheduler='x' is unknown;\n valid: euler")

    monkeypatch.setattr(stages, "run", refuse)
    status, _, out = call(server, "POST", "/api/run", {"steps": 1})
    assert status == 400 and out == {"error": "scheduler='x' is unknown; valid: euler", "field": "sampler"}


def test_an_oversize_body_is_refused_unread_and_a_missing_length_too(server):
    t0 = time.perf_counter()
    status, _, out = call(server, "POST", "/api/run", None, {"Content-Length": str(request.MAX_BODY_BYTES + 1)})
    assert status == 413 and "at most 16384" in out["error"] and time.perf_counter() - t0 < 5
    status, _, out = call(server, "POST", "/api/run", None, {"Content-Length": None})
    assert status == 411
    status, _, out = call(server, "POST", "/api/run", None, {"Content-Length": "-5"})
    assert status == 411
    status, _, out = call(server, "POST", "/api/run", None, {"Transfer-Encoding": "chunked"})
    assert status == 411


@pytest.mark.parametrize("host", ["evil.example:{port}", "127.0.0.1:1", "localhost", "127.0.0.1.evil.example:{port}",
                                  "", None])
def test_a_host_that_is_not_this_server_is_refused(server, host):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends its own Host."""
    headers = {"Host": host.format(port=server.port) if host is not None else None}
    for method, path in (("GET", "/"), ("GET", "/api/info"), ("POST", "/api/run")):
        status, _, out = call(server, method, path, {} if method == "POST" else None, headers)
        assert status == 403 and "is not this server" in out["error"], (method, path, out)


def test_localhost_and_its_port_are_accepted(server):
    assert call(server, "GET", "/api/info", headers={"Host": f"localhost:{server.port}"})[0] == 200
    assert call(server, "GET", "/api/info", headers={"Host": f"LOCALHOST:{server.port}"})[0] == 200


@pytest.mark.parametrize("headers, status, needle", [
    ({"Origin": "http://evil.example"}, 403, "another site"),
    ({"Origin": "null"}, 403, "another site"),
    ({"Origin": None, "Sec-Fetch-Site": "cross-site"}, 403, "cross-site requests are refused"),
    ({"Content-Type": "text/plain"}, 415, "application/json only"),  # what an HTML form can send
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json only"),
])
def test_cross_origin_posts_are_refused(server, headers, status, needle):
    got, _, out = call(server, "POST", "/api/run", {"steps": 1}, headers)
    assert got == status and needle in out["error"]


def test_a_post_without_origin_from_a_non_browser_client_is_served(server):
    assert call(server, "POST", "/api/run", {"steps": 1}, {"Origin": None})[0] == 200


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/index.html",
                                  "//etc/passwd", "/explore.js/../../../etc/passwd", "/index.html", "/request.py",
                                  "/..%2f..%2fserver.py", "/api/run", "/explore.js%00.png"])
def test_only_the_three_files_are_served(server, path):
    status, _, out = call(server, "GET", path)
    assert status == 404 and "no such page" in out["error"]


def test_the_page_and_its_files_forbid_anything_from_elsewhere(server):
    for path, kind in (("/", "text/html"), ("/?prompt=x&autorun=0", "text/html"), ("/explore.js", "text/javascript"),
                       ("/explore.css", "text/css")):
        status, r, body = call(server, "GET", path)
        assert status == 200 and r.getheader("Content-Type").startswith(kind)
        assert "default-src 'none'" in r.getheader("Content-Security-Policy")
        assert r.getheader("X-Content-Type-Options") == "nosniff"
        assert b"http://" not in body and b"https://" not in body and b"//cdn" not in body, path


def test_one_generation_at_a_time_the_second_gets_429(server):
    assert server.lock.acquire(timeout=60)  # as if a run were in progress
    try:
        status, r, out = call(server, "POST", "/api/run", {"steps": 1})
        assert status == 429 and r.getheader("Retry-After") == "1" and "one generation runs at a time" in out["error"]
    finally:
        server.lock.release()
    assert call(server, "POST", "/api/run", {"steps": 1})[0] == 200


def test_errors_never_crash_the_server(server, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("the UNet caught fire\nsecond line")

    monkeypatch.setattr(stages, "run", boom)
    status, _, out = call(server, "POST", "/api/run", {"steps": 1})
    assert status == 500 and out == {"error": "RuntimeError: the UNet caught fire"}
    monkeypatch.undo()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # garbage, then a hang-up
        s.sendall(b"\x16\x03\x01 not http\r\n\r\n")
        assert b'{"error": "Bad request version' in s.recv(4096)  # HTTP/0.9-style: the body alone
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST /api/run HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 100\r\n\r\n{{\"st".encode())  # a body cut short: the client leaves
    assert call(server, "POST", "/api/run", {"steps": 1})[0] == 200
    assert server.lock.acquire(blocking=False)
    server.lock.release()


# ---- binding and the command line -------------------------------------------------------------------
def test_bind_refuses_a_non_loopback_host_unless_told_and_a_taken_port():
    for host in ("0.0.0.0", "192.168.1.5", "example.com", "::"):
        with pytest.raises(ValueError, match="is not a loopback address.*--allow-remote"):
            bind(host, 0)
    with pytest.raises(ValueError, match="port=70000 must be an integer in"):
        bind("127.0.0.1", 70000)
    srv = bind("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{srv.port}: .*in use.*--port 0"):
            bind("127.0.0.1", srv.port)
    finally:
        srv.server_close()
    remote = bind("0.0.0.0", 0, allow_remote=True)
    try:
        assert remote.host_allowed(f"192.168.1.5:{remote.port}")  # an address of this machine, as a number
        assert not remote.host_allowed(f"evil.example:{remote.port}")  # a name: still the rebinding check
    finally:
        remote.server_close()


def test_ctrl_c_in_a_callers_interpreter_returns_to_it(tmp_path, monkeypatch, capsys):
    """Only the `ldm` command's own process ends itself after Ctrl-C (its shutdown could abort); a
    notebook or test that runs cli.main(["explore"]) gets control back, the socket closed."""
    from ldm.explore import server as server_mod
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDM_CHECKPOINT", raising=False)
    closed = []

    def interrupted(self):
        closed.append(self)
        raise KeyboardInterrupt
    monkeypatch.setattr(server_mod.ExploreServer, "serve", interrupted)
    assert not cli._is_the_command()
    assert cli.main(["explore", "--port", "0"]) == 0  # still here: the interpreter was not ended
    assert closed and closed[0].socket.fileno() == -1
    assert capsys.readouterr().err.strip().endswith("ldm explore: stopped")


def test_cli_failures_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LDM_CHECKPOINT", raising=False)
    taken = bind("127.0.0.1", 0)
    try:
        for argv, needle in ((["--host", "0.0.0.0"], "is not a loopback address"),
                             (["--port", str(taken.port)], "address already in use"),
                             (["--port", "0", "--checkpoint", "missing.safetensors"], "missing.safetensors")):
            rc = cli.main(["explore", *argv])
            out, err = capsys.readouterr()
            assert rc == 1 and err.count("\n") == 1 and err.startswith("ldm: error: ") and needle in err.lower(), err
            assert "Traceback" not in err
    finally:
        taken.server_close()
    assert cli.main(["explore", "--port", "x"]) == 2


def test_cli_serves_prints_the_url_and_stops_on_ctrl_c(tmp_path):
    env = {**os.environ, "LDM_CHECKPOINT": ""}
    # SIGINT at its default in the child: a shell without job control starts background jobs (a CI runner's
    # `.ci/run &`) with SIGINT ignored, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen([sys.executable, "-m", "ldm.cli", "explore", "--port", "0"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = None
        for line in p.stdout:
            if line.startswith("ldm explore: open "):
                url = line.split()[3]
                break
        assert url and url.startswith("http://127.0.0.1:"), url
        port = urllib.parse.urlsplit(url).port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/info")
        assert json.loads(conn.getresponse().read())["model"] == "ldm-shapes"
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0
        assert "ldm explore: stopped" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


# ---- the page in a browser -------------------------------------------------------------------------
class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tokens, self.state = {}, [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.state = a.get("data-state")
        if tag == "img":
            self.imgs.setdefault(a.get("class", ""), []).append(a.get("src", ""))
        if tag == "div" and "token" in a.get("class", "").split():
            self.tokens.append(int(a["data-id"]))


def chromium(url, profile, *flags, background=False):
    """Headless Chromium on url (as tests/test_docs.py runs it): only 127.0.0.1 resolves, so a page
    that needs anything from elsewhere shows it. background=True: a Popen, for the DevTools protocol."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *flags, url]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def dump(server, tmp_path, **params) -> _Dom:
    url = f"http://127.0.0.1:{server.port}/?" + urllib.parse.urlencode(params)
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    run = chromium(url, profile, "--dump-dom", "--virtual-time-budget=30000")
    assert run.returncode == 0, run.stderr[-2000:]
    dom = _Dom()
    dom.feed(run.stdout)
    assert dom.state == "done", f"the page did not finish: {run.stdout[:3000]}"
    return dom


@needs_browser
def test_the_page_shows_every_stage_from_its_url(server, tmp_path, pipe):
    dom = dump(server, tmp_path, prompt="a green triangle", seed=3, steps=6)
    assert dom.tokens == pipe.tokenizer(["a green triangle"])[0].tolist()[:5]
    assert len(dom.imgs["pixelated latent"]) == len(dom.imgs["pixelated x0"]) == 1
    assert len(dom.imgs["pixelated"]) + len(dom.imgs["pixelated current"]) == 6  # the x0 strip, one per step
    final = dom.imgs["pixelated final"]
    assert len(final) == 1 and final[0].startswith("data:image/png;base64,")
    other = dump(server, tmp_path, prompt="a green triangle", seed=4, steps=6, step=2)
    assert other.imgs["pixelated final"] != final  # another seed: another image
    assert other.imgs["pixelated x0"] != dom.imgs["pixelated x0"]  # step 2's x0, not the last one's


class DevTools:
    """The Chrome DevTools protocol over a WebSocket (RFC 6455: client frames masked, text only)."""

    def __init__(self, ws_url: str):
        u = urllib.parse.urlsplit(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        assert b" 101 " in head.split(b"\r\n")[0] and accept in head, head
        self.next_id = 0

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "DevTools closed the connection"
            data += chunk
        return data

    def _message(self) -> dict:
        payload = b""
        while True:
            b0, b1 = self._recv(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv(8))[0]
            payload += self._recv(n)
            if b0 & 0x80:
                return json.loads(payload)

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        data = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        while True:
            msg = self._message()
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if value := self.js(expression):
                return value
            time.sleep(0.1)
        raise AssertionError(f"waited {timeout} s for {expression}")

    def key(self, name: str, code: int):
        for kind in ("rawKeyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=code)


@needs_browser
def test_typing_a_prompt_and_moving_sliders_changes_the_page(server, tmp_path):
    url = f"http://127.0.0.1:{server.port}/?steps=5"
    profile = tmp_path / "profile-devtools"
    browser = chromium(url, profile, "--remote-debugging-port=0", "--window-size=1280,1000", background=True)
    try:
        active = profile / "DevToolsActivePort"  # Chromium writes its port there (line 1)
        end = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()) and browser.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        assert active.exists(), f"Chromium started no DevTools server (exit status {browser.poll()})"
        port = int(active.read_text().split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/json/list")
        pages = [t for t in json.loads(conn.getresponse().read()) if t["type"] == "page"]
        dt = DevTools(pages[0]["webSocketDebuggerUrl"])
        final = "document.querySelector('#images img') && document.body.dataset.state === 'done' && " \
                "document.querySelector('#images img').src"
        first = dt.wait(final)
        # type a prompt: select the old one, insert text as a keyboard would
        dt.js("document.getElementById('prompt').focus(); document.getElementById('prompt').select()")
        dt.send("Input.insertText", text="a green triangle")
        dt.wait("[...document.querySelectorAll('#tokens .piece')].map(t => t.textContent).join(' ') === "
                "'<start> a green triangle <end>'")
        typed = dt.wait(final)
        assert typed != first
        # a slider, by the keyboard: guidance 7.5 -> 8.0 runs the model again
        dt.js("document.getElementById('guidance').focus()")
        dt.key("ArrowRight", 39)
        assert dt.js("document.getElementById('guidance-value').textContent") == "8.0"
        dt.wait(f"document.body.dataset.state === 'done' && document.querySelector('#images img').src !== {typed!r}")
        # the step slider only redraws: step 5 -> 4 shows another x0
        x0 = dt.js("document.querySelector('#frames img.x0').src")
        dt.js("document.getElementById('step').focus()")
        dt.key("ArrowLeft", 37)
        assert dt.js("document.getElementById('step-value').textContent") == "4 / 5"
        assert dt.js("document.querySelector('#frames img.x0').src") != x0
        shot = base64.b64decode(dt.send("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "explore.png").write_bytes(shot)
        assert len(shot) > 20_000  # a page with images, not a blank one
    finally:
        browser.kill()
        browser.wait(timeout=30)
