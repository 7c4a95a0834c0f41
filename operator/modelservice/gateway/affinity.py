"""The routing key of a request: what a replica that served the same conversation before would hold in its KV cache.

An engine with prefix caching (vLLM's automatic prefix caching, llama.cpp's slot cache) skips the prefill of prompt
tokens it has seen, so the next turn of a conversation answers far sooner on the replica that served the previous one.
The key is the same for every turn of one conversation and differs between conversations:

- `X-Session-Id` (header), when the client sends one: the client knows its sessions best.
- Otherwise the conversation's head: every message up to and including the first user message (the system prompt
  and the opening question; each later turn only appends). Conversations that share only their system prompt get
  different keys, so they spread over the replicas (each replica soon holds the shared system prompt itself) instead
  of all landing on the one replica that a hash of the system prompt alone would choose.
- A completion's `prompt`: its first PROMPT_HEAD characters.

Bounded cost: each message contributes its role, its length, its first HEAD and last TAIL characters, for at most
MAX_MESSAGES messages; a 10 MB prompt or one token repeated a million times costs the same as a short one, and
nothing is kept between requests (the balancer hashes the key with each endpoint: rendezvous hashing, no index).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Mapping, Optional

SESSION_HEADER = "X-Session-Id"
MAX_SESSION = 256  # characters of the session id that count
MAX_MESSAGES = 8  # a head longer than this (many system messages) is cut here
HEAD = 1024  # characters from the start of each message
TAIL = 256  # and from its end: messages that share a long preamble still differ
PROMPT_HEAD = 4096  # characters of a completion prompt: no structure says where a conversation's head ends
MAX_MATERIAL = MAX_MESSAGES * (HEAD + TAIL + 64)  # bound on what one key hashes (characters, before encoding)


def affinity_key(doc: Optional[Mapping[str, Any]], headers: Mapping[str, str]) -> Optional[bytes]:
    """An 8-byte key, or None when the request carries nothing to route by (least in-flight then decides)."""
    session = headers.get(SESSION_HEADER)
    if session:
        return _digest(iter(("s", session[:MAX_SESSION])))
    if not isinstance(doc, Mapping):
        return None
    parts = list(material(doc))
    return _digest(iter(parts)) if parts else None


def material(doc: Mapping[str, Any]) -> Iterator[str]:
    """The bounded pieces of the request the key is made of."""
    messages = doc.get("messages")
    if isinstance(messages, list):
        for m in messages[:MAX_MESSAGES]:
            if not isinstance(m, Mapping):
                return
            role = m.get("role")
            text = _text(m.get("content"))
            yield f"m{role!s:.16}|{len(text)}|"
            yield text[:HEAD]
            yield text[-TAIL:] if len(text) > HEAD else ""
            if role == "user":
                return
        return
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of prompts: the first one decides
    if isinstance(prompt, str) and prompt:
        yield "p"
        yield prompt[:PROMPT_HEAD]


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list (images etc. are left out), bounded."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        size = 0
        for part in content[:MAX_MESSAGES]:
            t = part.get("text") if isinstance(part, Mapping) else None
            if isinstance(t, str):
                out.append(t[:HEAD])
                size += len(out[-1])
                if size >= HEAD:
                    break
        return "".join(out)
    return ""


def _digest(parts: Iterator[str]) -> bytes:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.digest()
