"""`ldm explore`: every stage of one generation, live in the browser, on a page served from this machine.

    ldm explore                          # the shipped shapes model (or a real checkpoint in weights/)
    ldm explore --checkpoint PATH --port 0

Type a prompt and the page shows, for that prompt: its tokens and ids; the cosine similarity of the
text encoder's output rows; the latent and the x0 estimate after every step (a slider scrubs them);
each word's cross-attention map at a chosen UNet layer; the final images. Steps, guidance, seed,
sampler, negative prompt and the number of images are controls; every change runs the model again
(the shipped model answers in about a second on two CPU cores).

    ldm.explore.request   what a request may ask for, checked field by field (400 names the field)
    ldm.explore.stages    the numbers, from the library's own APIs (tokenizer, condition, generate's
                          callback, unet.capture, the VAE)
    ldm.explore.server    the HTTP server: the page, GET /api/info, POST /api/run, and its guards

Why the standard library and not Gradio. Gradio is the field's usual choice for a demo like this,
and a good one where it fits: widgets for free, and a share link. Here it would bring several dozen
packages (FastAPI, uvicorn, pydantic, pandas, httpx, ...) into an educational library whose
dependencies are torch and five small ones, and its page loads fonts and scripts from CDNs, so it
breaks on a machine without a network, which is where a learner on a train or in a classroom may
be. What the explorer needs is small: one page, one JSON request, images. `http.server`'s
ThreadingHTTPServer, three static files shipped as package data, and PNGs as base64 data URLs do it
in a few hundred readable lines with no dependency and no external request at all (the page's
Content-Security-Policy forbids any). So there is no `explore` extra: `pip install ldm` has
everything `ldm explore` needs. The price is that the server is not a production web server: it
listens on 127.0.0.1, runs one generation at a time, and says so (see ldm.explore.server).
"""
from ldm.explore.request import BadRequest, Request
from ldm.explore.server import ExploreServer, bind

__all__ = ["BadRequest", "Request", "ExploreServer", "bind"]
