"""Conversations through a model's own chat template: token ids with the assistant turns
marked for the loss, prompts for generation, and streamed answers.

Why the masks are found by rendering prefixes: most chat templates (SmolLM2's, Llama 3's,
Qwen2's) carry no `{% generation %}` markers, so `return_assistant_tokens_mask` cannot
be used. Instead each assistant turn's span in the rendered text is where the rendering
of the turns before it, with the generation prompt, stops and the rendering that
includes it ends; the tokens starting inside a span are trained. That includes the
end-of-turn token the template writes after the answer, so the model learns to stop.
A template that renders earlier turns differently once later ones exist (some strip
reasoning from past turns) breaks that arithmetic and is refused by name.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from shomin.tasks.ground.errors import ConfigError, DataError


def require_template(tok, where: str) -> None:
    """format chat needs the model's own template; guessing one would train a dialect the
    model was never taught."""
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"{where}: the model's tokenizer has no chat template, which dataset.format chat needs; "
                          "use an instruct/chat model or format instruction with a template")


def render(tok, messages: list[dict], generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tok, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it."""
    text, spans = render(tok, messages), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(tok, messages[:i], True), render(tok, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}message {i + 1}: the chat template renders earlier turns differently once later "
                            "turns follow, so the assistant tokens cannot be located; train on single exchanges")
        spans.append((len(before), len(through)))
    return text, spans


def encode(tok, messages: list[dict], max_len: int, where: str = "") -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of the assistant tokens, cut at max_len."""
    text, spans = assistant_spans(tok, messages, where)
    if not getattr(tok, "is_fast", False):
        raise ConfigError("dataset.format chat: needs a fast (Rust) tokenizer to map tokens to characters")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= first < e for s, e in spans)) for first, _ in enc["offset_mapping"]]
    return enc["input_ids"][:max_len], mask[:max_len]


def generation_prompt(tok, messages: list[dict]) -> list[int]:
    """Ids that ask the model for the next assistant turn. The template writes any BOS itself,
    so the tokenizer must not add another."""
    return tok(render(tok, messages, True), add_special_tokens=False)["input_ids"]


def ask(tok, history: list[dict], fmt: str, template: dict) -> list[int]:
    """Ids that ask a tuned model for its next answer, prompted as its run trained it: chat data uses the chat template with the whole
    history; instruction data the run's own template around the last message (one turn, as
    it was trained); plain text is continued."""
    last = history[-1]["content"]
    if fmt == "chat" and getattr(tok, "chat_template", None):
        return generation_prompt(tok, history)
    if fmt == "instruction" and template:
        head = template["prompt_no_input"].format(instruction=last)
        return tok(head + template["response"].split("{output}")[0])["input_ids"]
    return tok(last)["input_ids"]


@contextmanager
def sigint_blocked():
    """Threads started inside (torch's workers while a model loads, the generation thread)
    inherit a signal mask without SIGINT, so Ctrl-C always reaches the main thread. The kernel
    hands a process's SIGINT to any thread that does not block it; one that lands on a helper
    thread leaves the main thread asleep in readline until the next key. A SIGINT that arrives
    inside is delivered when the mask is restored."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def stream_answer(model, tok, prompt_ids: list[int], max_new_tokens: int, device: str,
                  sample: bool = False, temperature: float = 0.7, top_p: float = 0.9) -> Iterator[str]:
    """Yields the answer's text as it is generated: generate() runs in a thread that feeds a
    streamer. Leaving the loop early (Ctrl-C) stops generation at its next token; an error
    in the thread is raised here instead of leaving the reader waiting forever."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop, failure = threading.Event(), []

    class Stopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    ids = torch.tensor([prompt_ids], device=device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  streamer=streamer, pad_token_id=tok.pad_token_id, do_sample=sample,
                  stopping_criteria=StoppingCriteriaList([Stopped()]))
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)

    def generate():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except Exception as e:   # noqa: BLE001 - handed to the reader below
            failure.append(e)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    with sigint_blocked():
        worker.start()
    try:
        yield from streamer
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]
