"""The explorer's HTTP server: the standard library's ThreadingHTTPServer, a fixed set of files, a JSON API.

    server = bind("127.0.0.1", 7860)      # listens at once: a port in use fails before the model loads
    server.attach(ldm.load())             # the pipeline the API runs (it answers 503 until then)
    server.serve()                        # until Ctrl-C; server.url is the address to open

    GET  /                 the page (static/index.html); /explore.js and /explore.css beside it
    GET  /api/info         the model, its samplers and cross-attention layers, the limits, the defaults
    POST /api/run          a JSON request (ldm.explore.request) -> every stage (ldm.explore.stages)

Every door is narrow, because any page in the user's browser and any program on the machine can
knock on it:

- It listens on 127.0.0.1 unless told otherwise, and refuses an address that is not loopback
  unless allow_remote=True (`ldm explore --host 0.0.0.0 --allow-remote`): the page has no login.
- The Host header must name this server (127.0.0.1, localhost or ::1, and the port): a DNS-rebinding
  page (evil.example resolving to 127.0.0.1) sends its own name and is refused with 403.
- POST needs `Content-Type: application/json` (an HTML form cannot send it, and a cross-origin fetch
  that does needs a CORS preflight this server never grants) and an Origin, if any, equal to
  http://<Host>; a browser's Sec-Fetch-Site other than same-origin / none is refused too.
- Bodies: Content-Length required (411), at most request.MAX_BODY_BYTES (413, without reading it);
  each field checked (ldm.explore.request: 400 with {"error", "field"}).
- Files: a fixed table of three names, read from the package; any other path is 404, so no
  "..", "%2e%2e" or absolute path reaches the file system.
- One generation at a time: a second POST /api/run while one runs gets 429 with Retry-After: 1, at
  once, rather than queueing threads that each hold a run's memory. The page never sends two at
  once: it keeps the newest settings and sends them when the answer comes.
- Nothing escapes a handler: a library error is a 400 or 500 JSON answer in one line (logged with
  its traceback), and a client that hangs up mid-answer is ignored. A slow client times out (20 s).
"""
from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import socketserver
import threading
from importlib import resources
from urllib.parse import urlsplit

from ldm.explore import stages
from ldm.explore.request import LIMITS, MAX_BODY_BYTES, BadRequest, Request, parse

__all__ = ["ExploreServer", "bind", "is_loopback"]

log = logging.getLogger(__name__)

STATIC = {  # URL path -> (file in ldm/explore/static, content type): the only files ever served
    "/": ("index.html", "text/html; charset=utf-8"),
    "/explore.js": ("explore.js", "text/javascript; charset=utf-8"),
    "/explore.css": ("explore.css", "text/css; charset=utf-8"),
}
# The page loads nothing from elsewhere, and may not: no CDN, no fonts, no frames, images only as data: URLs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
LOCAL_NAMES = {"127.0.0.1", "localhost", "::1"}
OPTION_FIELDS = {"scheduler": "sampler", "negative_prompt": "negative_prompt", "steps": "steps",
                 "guidance": "guidance", "seed": "seed", "num_images": "num_images"}  # library name -> ours


def is_loopback(host: str) -> bool:
    """localhost, or an IP address of the loopback network (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ExploreServer(http.server.ThreadingHTTPServer):
    """The server and what the handlers share: the pipeline, its layers, the one-run lock."""

    daemon_threads = True

    def __init__(self, host: str, port: int, allow_remote: bool = False):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.host, self.port = host, self.server_address[1]
        self.allow_remote = allow_remote
        self.names = LOCAL_NAMES | {host}
        if allow_remote:
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.pipe, self.layers, self.default_layer = None, [], None
        self.lock = threading.Lock()  # one generation at a time

    def server_bind(self) -> None:
        """Bind, without http.server's reverse DNS lookup of the address (slow, or hanging, offline)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def attach(self, pipe) -> None:
        """Serve `pipe` (an ldm Pipeline): find its cross-attention layers once."""
        self.layers = stages.cross_attention_layers(pipe)
        self.default_layer = stages.default_layer(self.layers)
        self.pipe = pipe

    def handle_error(self, request, client_address) -> None:
        """An exception a handler did not answer (socketserver's default prints it to stderr)."""
        log.exception("ldm explore: a request from %s failed", client_address[0])

    def serve(self) -> None:
        """Answer requests until Ctrl-C (KeyboardInterrupt propagates after the socket is closed)."""
        try:
            self.serve_forever(poll_interval=0.25)
        finally:
            self.server_close()

    def host_allowed(self, header: str | None) -> bool:
        """Does a Host header name this server? (the DNS-rebinding check)"""
        if not header:
            return False
        header = header.strip().lower()
        if header.startswith("["):  # [::1]:7860
            name, _, rest = header[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            name, _, port = header.partition(":")
        if port != str(self.port) and not (port == "" and self.port == 80):
            return False
        if name in self.names:
            return True
        if self.allow_remote:  # an address of this machine, typed as a number
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False


def bind(host: str = "127.0.0.1", port: int = 7860, *, allow_remote: bool = False) -> ExploreServer:
    """A listening ExploreServer (port 0: any free port, see .port); one-line errors for a refused
    address and a port that is taken."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} must be an integer in [0, 65535] (0: any free port)")
    if not is_loopback(host) and not allow_remote:
        raise ValueError(f"host={host!r} is not a loopback address: the explorer has no login, so anyone who "
                         f"can reach it can run the model; use 127.0.0.1, or say --allow-remote to serve "
                         f"your network on purpose")
    try:
        return ExploreServer(host, port, allow_remote)
    except OSError as e:
        why = e.strerror or str(e)
        hint = " (another `ldm explore`? --port 0 picks a free port)" if port and "in use" in why else ""
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {why}{hint}") from None


def _static(name: str) -> bytes:
    return resources.files("ldm.explore").joinpath("static", name).read_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    server: ExploreServer
    server_version = "ldm-explore"
    sys_version = ""
    timeout = 20  # seconds a client may take to send its request

    # ---- answers ----------------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, code: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Content-Security-Policy", CSP)
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up: nobody to answer
            self.close_connection = True

    def _json(self, code: int, data: dict, extra: dict | None = None) -> None:
        self._send(code, json.dumps(data, allow_nan=False).encode(), "application/json", extra)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, headers too long) as JSON too."""
        self.close_connection = True
        self._json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _error(self, code: int, message: str, field: str | None = None, extra: dict | None = None) -> None:
        self._json(code, {"error": message, **({"field": field} if field else {})}, extra)

    # ---- the checks every request passes ------------------------------------------------------
    def _checked_host(self) -> bool:
        if self.server.host_allowed(self.headers.get("Host")):
            return True
        self._error(403, f"Host {self.headers.get('Host', '')[:80]!r} is not this server (only "
                         f"127.0.0.1:{self.server.port} or localhost:{self.server.port}): refused, as a "
                         f"DNS-rebinding page would be")
        return False

    def _same_origin(self) -> bool:
        origin = self.headers.get("Origin")
        site = self.headers.get("Sec-Fetch-Site")
        if origin is not None and origin.lower() != f"http://{self.headers.get('Host', '').lower()}":
            self._error(403, f"Origin {origin[:80]!r} is another site: cross-origin requests are refused")
            return False
        if site is not None and site not in ("same-origin", "none"):
            self._error(403, f"Sec-Fetch-Site {site[:40]!r}: cross-site requests are refused")
            return False
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            self._error(415, f"Content-Type {kind[:60]!r}: the API takes application/json only")
            return False
        return True

    def _body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(411, "Transfer-Encoding is not supported: send a Content-Length")
            return None
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True
            self._error(411, f"Content-Length {length[:40]!r}: a length in bytes is required")
            return None
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body is never read
            self._error(413, f"the body is {int(length)} bytes; at most {MAX_BODY_BYTES} are allowed",
                        field="body")
            return None
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            self.close_connection = True
            self._error(400, f"the body ended after {len(body)} of {length} bytes", field="body")
            return None
        return body

    # ---- the routes ------------------------------------------------------------------------------
    def do_GET(self):
        if not self._checked_host():
            return
        path = urlsplit(self.path).path
        if path in STATIC:
            name, content_type = STATIC[path]
            return self._send(200, _static(name), content_type)
        if path == "/api/info":
            return self._info()
        self._error(404, f"no such page {path[:80]!r}; the explorer serves {', '.join(STATIC)} and /api/")

    do_HEAD = do_GET

    def do_POST(self):
        if not (self._checked_host() and self._same_origin()):
            return
        path = urlsplit(self.path).path
        if path != "/api/run":
            self.close_connection = True
            return self._error(404, f"no such API {path[:80]!r}; POST goes to /api/run")
        body = self._body()
        if body is None:
            return
        if self.server.pipe is None:
            return self._error(503, "the model is still loading; try again in a moment", extra={"Retry-After": "1"})
        try:
            req = parse(body, [d["name"] for d in self.server.layers], self.server.default_layer)
        except BadRequest as e:
            return self._error(400, str(e), field=e.field)
        if not self.server.lock.acquire(blocking=False):
            return self._error(429, "busy: one generation runs at a time; send this again when it is done",
                               extra={"Retry-After": "1"})
        try:
            out = stages.run(self.server.pipe, req, self.server.layers)
            try:
                body = json.dumps(out, allow_nan=False).encode()
            except ValueError as e:  # NaN/inf in a number: a fault of the model's, not the request's
                raise FloatingPointError(f"the run produced a non-finite number ({e})") from None
        except ValueError as e:  # the library's own checks (ldm.options), named as the page names them
            name = str(e).split("=", 1)[0]
            name = name if name.isidentifier() else None
            return self._error(400, " ".join(str(e).split()), field=OPTION_FIELDS.get(name, name))
        except Exception as e:  # noqa: BLE001 (the server outlives any one run)
            log.exception("ldm explore: the run failed")
            first = (str(e).strip().splitlines() or [""])[0]
            return self._error(500, f"{type(e).__name__}: {first[:300]}")
        finally:
            self.server.lock.release()
        self._send(200, body, "application/json")

    def _info(self) -> None:
        pipe = self.server.pipe
        if pipe is None:
            return self._error(503, "the model is still loading; try again in a moment", extra={"Retry-After": "1"})
        from ldm import samplers, weights

        defaults = Request().__dict__ | {"layer": self.server.default_layer}
        if pipe.name != weights.SHIPPED.stem:
            defaults["prompt"] = "a photograph of an astronaut riding a horse"
        self._json(200, {
            "model": pipe.name, "family": pipe.family.name, "size": pipe.default_size,
            "samplers": list(samplers.SAMPLERS), "layers": self.server.layers, "defaults": defaults,
            "limits": {k: list(v) if isinstance(v, tuple) else v for k, v in LIMITS.items()},
            "x0_preview": "vae" if pipe.unet.cfg.sample_size <= stages.X0_VAE_MAX else "cheap",
        })
