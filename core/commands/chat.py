"""`python -m core chat RUN`: chat with a run's adapter in the terminal, or answer one --prompt and exit.

Interactive: one line per message, the reply streams to stdout; /reset clears the history, /exit (or Ctrl-D) quits.
With --compare the base model answers first, then the adapter, each streamed and labelled.
"""

import sys
from core.chat import ChatSession, GenSettings


def add_arguments(p) -> None:
    p.add_argument("run", help='run id, or "latest" for the most recent completed run')
    p.add_argument("--checkpoint", type=int, default=None, metavar="N", help="use checkpoint-N instead of the final adapter")
    p.add_argument("--compare", action="store_true", help="answer with the base model too, labelled base: / adapter:")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="answer this one message and exit")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="longest reply (1..1024, default 256)")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling (default 0.9)")
    p.add_argument("--seed", type=int, default=None, help="fix the sampling seed for repeatable answers")
    p.add_argument("--system", default="", metavar="S", help="system prompt")
    p.add_argument("--quant", choices=["4bit"], default=None, help="load the base in 4-bit (less VRAM)")


def run(args) -> int:
    settings = GenSettings.of({"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                               "top_p": args.top_p, "seed": args.seed, "system": args.system})
    session = ChatSession()
    name = session.load_run(args.run, args.checkpoint, args.quant)
    if session.template_notice:
        print(f"note: {session.template_notice}", file=sys.stderr)
        if args.compare:
            print("note: the base side answers without ever having seen this format: expect it to run on to "
                  f"--max-new-tokens ({args.max_new_tokens}); the adapter learned where a reply ends", file=sys.stderr)
    if args.prompt is not None:
        _answer(session, [{"role": "user", "content": args.prompt}], settings, name, args.compare)
        return 0

    print(f"chatting with {name} on {session.source} ({session.device}). /reset clears, /exit or Ctrl-D quits.",
          file=sys.stderr)
    history = []
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        reply = _answer(session, history, settings, name, args.compare)
        history.append({"role": "assistant", "content": reply})


def _answer(session, messages, settings, name, compare: bool) -> str:
    """Stream one reply (two with compare) to stdout; returns the adapter's text for the history."""
    if compare:
        _stream(session, messages, settings, None, "base: ")
    return _stream(session, messages, settings, name, "adapter: " if compare else "")


def _stream(session, messages, settings, adapter, label: str) -> str:
    out = sys.stdout
    out.write(label)
    shown = ""
    for text in session.stream(messages, settings, adapter=adapter):
        # text is the whole reply so far: print what is new. A terminal cannot take back characters, so if a
        # later decode changes earlier text (rare: tokenizer space clean-up) the returned history has the truth.
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write("\n")
    out.flush()
    return shown
