"""``python -m aquila_npu.generate`` / ``aquila-npu generate``: text generation and chat (``torchrun`` for TP > 1).

    python -m aquila_npu.generate --plugin FAMILY --model NAME --load CKPT --tokenizer-name-or-path TOK \\
        --prompt "..." [--prompt ...] [--prompt-file prompts.txt|prompts.jsonl] [--output results.jsonl] \\
        [--max-new-tokens 128] [--greedy | --temperature 0.7 --top-k 50 --top-p 0.95 --seed 1234] [--stop S]
    python -m aquila_npu.generate ... --chat            # interactive: `clear` resets the history, `exit` quits
    python -m aquila_npu.generate ... --chat --prompt-file conversations.jsonl   # {"messages": [...]} per line

Without prompts, prompts are read from stdin, one per line. ``--load-model-type hf`` loads a Hugging Face folder
(converted in memory). One prompt (or a chat turn) streams to the terminal as it is generated; a batch shows a
progress bar and prints each completion when done. The tokens/s figure goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from aquila_npu.errors import AquilaNpuError
from aquila_npu.inference import add_model_arguments, model_options_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aquila_npu.generate",
                                     description="Generate text or chat with an Aquila2 checkpoint on megatron-core.")
    add_model_arguments(parser)
    g = parser.add_argument_group("engine")
    g.add_argument("--max-batch-size", "--micro-batch-size", type=int, default=8, dest="max_batch_size",
                   help="prompts generated together (KV cache rows)")
    g.add_argument("--max-sequence-length", "--seq-length", type=int, default=None, dest="max_sequence_length",
                   help="prompt + generated tokens (default: the model's maximum positions)")
    p = parser.add_argument_group("prompts and output")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", default=None, help="one prompt per line, or JSONL with a 'prompt' field "
                                                       "(--chat: a 'messages' list)")
    p.add_argument("--output", default=None, help="write one JSON object per prompt: prompt, text, tokens")
    p.add_argument("--no-stream", action="store_true", help="print a single completion only when it is done")
    p.add_argument("--add-bos", dest="add_bos", action="store_true", default=None,
                   help="prepend BOS to each prompt (default: the model family's choice)")
    p.add_argument("--no-add-bos", dest="add_bos", action="store_false")
    s = parser.add_argument_group("sampling (defaults: ModelLink's)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling flags)")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-k", type=int, default=50, help="0: no top-k filter")
    s.add_argument("--top-p", type=float, default=0.95, help="0 or 1: no nucleus filter")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--stop", action="append", default=[], help="a string that ends a completion (repeatable)")
    c = parser.add_argument_group("chat")
    c.add_argument("--chat", action="store_true", help="chat with the model's conversation template")
    c.add_argument("--chat-template", default=None, help="a template the model family declares (default: the "
                                                         "model's)")
    c.add_argument("--system", default=None, help="system message for the chat")
    return parser


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _shared(value):
    """``value`` as rank 0 has it (stdin is read by rank 0 only)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _say(text: str = "", end: str = "\n", err: bool = False) -> None:
    if _rank() == 0:
        stream = sys.stderr if err else sys.stdout
        stream.write(text + end)
        stream.flush()


def read_prompt_file(path: str, chat: bool) -> list:
    """Prompts (strings) or, with ``chat``, conversations (message lists) from a text or JSONL file."""
    if not os.path.isfile(path):
        raise AquilaNpuError(f"--prompt-file {path}: no such file")
    if not (chat or path.endswith((".jsonl", ".json"))):
        try:
            with open(path, encoding="utf-8") as f:
                items = [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as exc:
            raise AquilaNpuError(f"--prompt-file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    else:
        from aquila_npu.files import read_json_lines

        key = "messages" if chat else "prompt"
        items = []
        for number, record in read_json_lines(path, f"--prompt-file {path}"):
            where = f"--prompt-file {path}, line {number}"
            if key not in record:
                raise AquilaNpuError(f"{where}: expected an object with a {key!r} field")
            value = record[key]
            valid = (isinstance(value, list) and all(isinstance(m, dict) for m in value)) if chat \
                else isinstance(value, str)
            if not valid:
                raise AquilaNpuError(f"{where}: {key!r} must be " + ("a list of {\"role\", \"content\"} objects"
                                                                     if chat else "a string"))
            items.append(value)
    if not items:
        raise AquilaNpuError(f"--prompt-file {path}: no prompts in it")
    return items


def write_jsonl(path: str, records: list[dict]) -> None:
    """All records, one JSON object a line; the file appears only when complete."""
    from aquila_npu.files import atomic_text_file

    with atomic_text_file(path, "--output") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _sampling(args):
    from aquila_npu.generate import SamplingOptions

    options = SamplingOptions(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    options.check()
    return options


def _options(args):
    from aquila_npu.generate import GenerateOptions

    return GenerateOptions(**model_options_from_args(args), max_batch_size=args.max_batch_size,
                           max_sequence_length=args.max_sequence_length, add_bos=args.add_bos)


class _Printer:
    """Streams one completion to stdout (rank 0), or shows a progress bar over a batch's tokens."""

    def __init__(self, generator, count: int, max_new_tokens: int, stream: bool, stop=(), strip_space=False):
        from aquila_npu.generate.stream import TextStream

        self.stream = None
        self.bar = None
        if _rank() != 0:
            return
        if count == 1 and stream:
            self.stream = TextStream(generator.tokenizer.detokenize, lambda t: _say(t, end=""), stop, strip_space)
        else:
            from tqdm import tqdm

            self.bar = tqdm(total=count * max_new_tokens, desc="generating", unit="tok", file=sys.stderr,
                            leave=False)

    def __call__(self, index: int, token: int) -> None:
        if self.stream is not None:
            self.stream.feed(token)
        elif self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            _say()
        if self.bar is not None:
            self.bar.close()


def _report(stats) -> None:
    _say(f"[generated {stats.generated_tokens} tokens for {stats.prompts} prompt(s) in {stats.seconds:.2f} s: "
         f"{stats.tokens_per_second:.1f} tokens/s]", err=True)


def run_prompts(generator, args, prompts: list[str]) -> list[dict]:
    from aquila_npu.generate import GenerationStats

    sampling, stats = _sampling(args), GenerationStats()
    printer = _Printer(generator, len(prompts), sampling.max_new_tokens, not args.no_stream, sampling.stop)
    try:
        completions = generator.generate(prompts, sampling, on_token=printer, stats=stats)
    finally:
        printer.close()
    if printer.stream is None:
        for index, completion in enumerate(completions):
            _say(f"### prompt {index + 1}: {completion.prompt}\n{completion.text}\n")
    _report(stats)
    return [{"prompt": c.prompt, "text": c.text, "tokens": c.tokens} for c in completions]


def run_conversations(generator, args, conversations: list[list[dict]], stream: bool) -> list[dict]:
    """Each conversation's next assistant turn, generated as one batch (``stream``: a single one streams)."""
    from aquila_npu.generate import GenerationStats

    template = generator.chat_template(args.chat_template)
    sampling, stats = _sampling(args), GenerationStats()
    sampling.stop = tuple(sampling.stop) + template.stop
    rendered = [template.render(_with_system(messages, args.system)) for messages in conversations]
    printer = _Printer(generator, len(rendered), sampling.max_new_tokens, stream, sampling.stop, True)
    try:
        completions = generator.generate(rendered, sampling, on_token=printer, add_bos=template.add_bos, stats=stats)
    finally:
        printer.close()
    records = []
    for messages, completion in zip(conversations, completions):
        reply = template.reply_text(completion.text)
        if printer.stream is None:
            _say(f"### {messages[-1].get('content', '')}\n{reply}\n")
        records.append({"messages": messages, "prompt": completion.prompt, "text": reply, "tokens": completion.tokens})
    _report(stats)
    return records


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system}] + messages


def interactive_chat(generator, args) -> None:
    """Read a user turn, stream the reply; ``clear`` forgets the conversation, ``exit`` (or end of input) quits."""
    template = generator.chat_template(args.chat_template)
    _say(f"chat ({template.name} template): type a message; 'clear' resets the history, 'exit' quits", err=True)
    history: list[dict] = []
    while True:
        line = None
        if _rank() == 0:
            try:
                line = input("User: ")
            except EOFError:
                line = "exit"
        line = _shared(line)
        command = line.strip()
        if command == "exit":
            return
        if command == "clear":
            history = []
            _say("(history cleared)", err=True)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        if _rank() == 0:
            print("Assistant: ", end="", flush=True)
        record = run_conversations(generator, args, [history], stream=True)[0]
        history.append({"role": "assistant", "content": record["text"]})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from aquila_npu import distributed

    return distributed.run_command("generate", lambda: _run(args))


def _run(args) -> None:
    if args.chat and not (args.prompt or args.prompt_file):
        mode, items = "interactive", None
    elif args.prompt or args.prompt_file:
        mode = "given"
        items = list(args.prompt) + (read_prompt_file(args.prompt_file, args.chat) if args.prompt_file else [])
    else:
        mode, items = "stdin", None
    _sampling(args)  # bad sampling flags fail before the model loads
    if args.output:
        from aquila_npu.files import check_writable_file

        check_writable_file(args.output, "--output")
    from aquila_npu.generate import TextGenerator

    generator = TextGenerator(_options(args))
    if mode == "interactive":
        interactive_chat(generator, args)
        return
    if mode == "stdin":
        items = _shared([line.rstrip("\n") for line in sys.stdin if line.strip()] if _rank() == 0 else None)
        if not items:
            raise AquilaNpuError("no prompts: give --prompt, --prompt-file, or prompts on stdin (one per line)")
    if args.chat:
        conversations = [m if isinstance(m, list) else [{"role": "user", "content": m}] for m in items]
        records = run_conversations(generator, args, conversations, stream=not args.no_stream)
    else:
        records = run_prompts(generator, args, items)
    if args.output and _rank() == 0:
        write_jsonl(args.output, records)
        _say(f"wrote {len(records)} result(s) to {args.output}", err=True)


if __name__ == "__main__":
    sys.exit(main())
