"""`shomin chat PIPELINE|RUN`: talk to what a run made, in the terminal; `shomin export`
writes it out for other tools.

The model is the run's result (tasks/ground/outputs.py: PPO policy, merged model, or
base + SFT adapter), prompted the way the run trained it (tasks/models/chat.py).
Answers stream as they are generated. `--prompt` answers once and exits, for scripts;
otherwise each line of input is a turn (a terminal gets a `you>` prompt, a pipe does
not). `--compare` answers with the pipeline's base model too. Ctrl-C or end of input
leaves without a traceback. Status lines go to stderr, answers to stdout.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from shomin.tasks.ground.errors import ConfigError
from shomin.tasks.ground.outputs import RunModel, find_run, latest_completed, run_model


def resolve_target(target: str, config: str) -> Path:
    """A run folder, PIPELINE/RUN_ID, or a pipeline name (its newest completed run)."""
    try:
        return find_run(target)
    except ConfigError:
        if "/" in target or not Path(config).exists():
            raise
    from shomin.tasks import registry
    pipelines = registry.load_config(config)
    if target not in pipelines:
        raise ConfigError(f"{target}: neither a run folder nor a pipeline of {config}")
    return latest_completed(Path(pipelines[target].output_dir), target)


class Speaker:
    """The tuned model (and, for --compare, the base) with its tokenizer, loaded once."""

    def __init__(self, found: RunModel, device: str, compare: bool):
        from shomin.tasks.ground.settings import ModelSpec
        from shomin.tasks.models.loading import load_causal_lm, load_tokenizer
        self.found, self.device = found, device
        self.tok = load_tokenizer(found.tokenizer)
        self.model = load_causal_lm(found.weights, ModelSpec(source=str(found.weights)), device)
        if found.adapter:
            from peft import PeftModel
            self.model = PeftModel.from_pretrained(self.model, str(found.adapter))
        self.model.eval()
        self.base = None
        if compare and not found.adapter:   # with an adapter the base is the same weights, adapter off
            self.base = load_causal_lm(found.base, ModelSpec(source=str(found.base)), device).eval()

    def answer(self, history: list[dict], args, out, base: bool = False) -> str:
        from contextlib import nullcontext

        from shomin.tasks.models.chat import ask, stream_answer
        ids = ask(self.tok, history, self.found.dataset_format, self.found.template)
        model, quiet = self.model, nullcontext()
        if base:
            model = self.base or self.model
            if self.base is None:
                quiet = self.model.disable_adapter()
        text = []
        with quiet:
            for piece in stream_answer(model, self.tok, ids, args.max_new_tokens, self.device,
                                       sample=args.temperature > 0, temperature=args.temperature or 1.0):
                out.write(piece)
                out.flush()
                text.append(piece)
        out.write("\n")
        out.flush()
        return "".join(text).strip()

    def describe(self) -> str:
        f = self.found
        turns = "whole conversation" if f.dataset_format == "chat" else "one turn at a time, as trained"
        return f"{f.kind} of {f.run} (dataset format {f.dataset_format}: {turns})"


def _turn(speaker: Speaker, history: list[dict], args, out) -> None:
    label = args.compare
    if label:
        out.write("tuned> ")
    reply = speaker.answer(history, args, out)
    if label:
        out.write("base>  ")
        speaker.answer(history, args, out, base=True)
    history.append({"role": "assistant", "content": reply})


def _read(prompt: str, interactive: bool) -> str | None:
    if interactive:
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\n")


def ctrl_c_leaves() -> None:
    """Ctrl-C at the prompt raises KeyboardInterrupt, as the banner promises, even where the chat
    inherited SIGINT ignored: a non-interactive shell starts its background commands that way
    (`cmd &` in a script, `nohup`), and Python then installs no handler of its own, so the key
    did nothing at all. Called only when stdin is a terminal; acts only in the main thread."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def converse(speaker: Speaker, args, out=sys.stdout) -> int:
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    if args.prompt is not None:
        _turn(speaker, history + [{"role": "user", "content": args.prompt}], args, out)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        ctrl_c_leaves()
    print(f"shomin chat: {speaker.describe()}\n/reset clears the conversation; /exit, Ctrl-D or Ctrl-C leaves.",
          file=sys.stderr)
    while True:
        line = _read("you> ", interactive)
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        _turn(speaker, history, args, out)


def cmd_chat(args) -> int:
    from shomin.tasks.models.chat import sigint_blocked   # imports no torch
    run = resolve_target(args.target, args.file)
    try:
        # The threads torch starts never take Ctrl-C from the prompt: those of loading, and the
        # one `import torch` itself starts, so torch is first imported in here.
        with sigint_blocked():
            from shomin.tasks.models.loading import resolve_device
            speaker = Speaker(run_model(run), resolve_device(args.device), args.compare)
        return converse(speaker, args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 0


def add_parser(sub, with_file) -> None:
    c = with_file(sub.add_parser("chat", help="talk to a run's result in the terminal (streams tokens)"))
    c.add_argument("target", help="a run folder, PIPELINE/RUN_ID, or a pipeline (its newest completed run)")
    c.add_argument("--prompt", help="answer this once and exit")
    c.add_argument("--compare", action="store_true", help="also answer with the pipeline's base model")
    c.add_argument("--system", help="a system prompt (chat-format runs)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the same answer every time)")
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    c.set_defaults(fn=cmd_chat)


def cmd_export(args) -> int:
    from shomin.tasks.models.exporting import export_run
    run = resolve_target(args.target, args.file)
    found = run_model(run)
    dest = Path(args.out) if args.out else run / "export" / args.format
    export_run(found, args.format, dest, args.outtype)
    files = sorted(p.name for p in dest.iterdir() if not p.name.startswith("."))
    print(f"{dest}: {args.format} of the {found.kind} result ({', '.join(files)})")
    return 0


def add_export_parser(sub, with_file) -> None:
    e = with_file(sub.add_parser("export", help="write a run's result as GGUF (+ Ollama Modelfile), merged or adapter"))
    e.add_argument("target", help="a run folder, PIPELINE/RUN_ID, or a pipeline (its newest completed run)")
    e.add_argument("--format", required=True, choices=("gguf", "merged", "adapter"))
    e.add_argument("--outtype", default="q8_0", choices=("f16", "q8_0"), help="GGUF tensor type")
    e.add_argument("--out", help="destination folder (default RUN/export/FORMAT)")
    e.set_defaults(fn=cmd_export)
