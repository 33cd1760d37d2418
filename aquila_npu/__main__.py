"""``aquila-npu`` / ``python -m aquila_npu``: list plugins and patches, run the CPU quickstart.

Subcommands:
  convert     Hugging Face <-> Megatron checkpoint conversion (``python -m aquila_npu.convert``)
  preprocess  parquet / JSON records -> Megatron indexed datasets (``python -m aquila_npu.preprocess``)
  pretrain    pretrain / fine-tune on megatron-core (``torchrun ... -m aquila_npu.pretrain``)
  generate    text generation and chat on megatron-core's inference engine (``python -m aquila_npu.generate``)
  evaluate    BoolQ / MMLU / C-Eval accuracy, as lm-evaluation-harness computes it (``python -m aquila_npu.evaluate``)
  lm-eval     lm-evaluation-harness's command line with the ``aquila-npu`` model (``python -m aquila_npu.lm_eval``)
  plugins     installed plugins, their hooks, model specs and devices (``--model NAME``: one spec in detail;
              ``--patches``: the patches a device registers)
  quickstart  the seed workflow end to end on a tiny model, on whatever device this machine has
  doctor      versions, devices, kernel implementations, and what the NPU path lacks on this machine;
              ``--check``: run this build on the device against the reference (one table, a verdict, exit 1)
"""

from __future__ import annotations

import argparse
import sys

from aquila_npu.errors import USER_ERRORS


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip(),
             "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    from aquila_npu import plugin_manager

    plugins = plugin_manager.get()
    selected = args.plugin or None
    if selected:
        plugins.require(selected)
    if args.patches:
        from aquila_npu.megatron_lm import route_plugins

        # listing needs no device: `--device npu` lists the NPU's patches on any machine
        device = args.device if args.device in plugins.devices() else plugins.select_device(args.device)
        # the Megatron-LM route's own patches are listed too (the autoload registers them in such a job)
        route = {name: module for name, module in route_plugins().items() if plugins.pm.get_plugin(name) is None}
        for name, module in route.items():
            plugins.pm.register(module, name=name)
        try:
            registry = plugins.patch_registry(device)
        finally:
            for name in route:
                plugins.pm.unregister(name=name)
        from aquila_npu import unpickling
        from aquila_npu.patching import PatchRegistry

        loading = PatchRegistry()
        unpickling.register_patches(loading)
        print(f"patches registered for device {device} ({len(registry)}; owners megatron-lm and megatron-lm-inference: "
              f"on the Megatron-LM route (pretrain_gpt.py --plugin, ...) only; owner aquila-npu: on every device, before a checkpoint is "
              f"opened):")
        print(_table(registry.rows() + loading.rows(), ["owner", "target", "reason"]))
        return 0
    if args.model:
        family, spec = plugins.find_model(args.model, selected)
        print(f"{spec.name} ({family.name}): {spec.description}")
        for key, value in vars(spec).items():
            print(f"  {key:32} {value}")
        print("Megatron-LM flags: " + " ".join(f"{k} {v}" if v is not None else k
                                               for k, v in spec.megatron_lm_flags().items()))
        return 0
    rows = []
    for name in plugins.names():
        if selected and name not in selected:
            continue
        module = plugins.pm.get_plugin(name)
        rows.append({"plugin": name, "module": getattr(module, "__name__", str(module)),
                     "hooks": ", ".join(h.removeprefix("aquila_npu_") for h in plugins.hooks_of(name))})
    print("plugins (entry-point group aquila_npu.plugins):")
    print(_table(rows, ["plugin", "module", "hooks"]))
    specs = []
    for family in plugins.families(selected).values():
        for s in family.specs:
            specs.append({"model": s.name, "family": family.name, "layers": s.num_layers, "hidden": s.hidden_size,
                          "ffn": s.ffn_hidden_size, "heads": s.num_attention_heads, "kv groups": s.num_query_groups,
                          "seq": s.seq_length, "vocab": s.vocab_size, "rope base": f"{s.rotary_base:g}",
                          "eps": f"{s.norm_epsilon:g}", "dtype": s.params_dtype})
    print("\nmodel specs:")
    print(_table(specs, ["model", "family", "layers", "hidden", "ffn", "heads", "kv groups", "seq", "vocab",
                         "rope base", "eps", "dtype"]))
    devices = [{"device": d, "priority": p, "available": "yes" if plugins.device_available(d) else "no",
                "backend": plugins.backend(d) or ""} for d, p in plugins.devices().items()]
    print("\ndevices (automatic selection takes the first available):")
    print(_table(devices, ["device", "priority", "available", "backend"]))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from aquila_npu import quickstart

    return quickstart.run(quickstart.QuickstartOptions(
        workdir=args.workdir, tokenizer=args.tokenizer, device=args.device, skip_tp2=args.skip_tp2, model=args.model,
        alpaca=args.alpaca, stop_after=args.stop_after))


def cmd_doctor(args: argparse.Namespace) -> int:
    from aquila_npu import doctor

    if not args.check:
        print(doctor.render(doctor.collect()))
        return 0
    from aquila_npu import doctor_check
    from aquila_npu.known_warnings import silence

    silence()
    rows, device = doctor_check.run(args.device, all_reduce=args.all_reduce)
    print(doctor_check.render(rows, device), flush=True)
    return 1 if any(r.failed for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aquila-npu", description="Aquila2 on unmodified Megatron, via plugins.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron (see convert --help)")
    sub.add_parser("preprocess", help="tokenise records into Megatron indexed datasets (see preprocess --help)")
    sub.add_parser("pretrain", help="pretrain or fine-tune on megatron-core (see pretrain --help)")
    sub.add_parser("generate", help="generate text or chat from a checkpoint (see generate --help)")
    sub.add_parser("evaluate", help="multiple-choice accuracy of a checkpoint (see evaluate --help)")
    sub.add_parser("lm-eval", help="lm-evaluation-harness with the aquila-npu model (lm-eval's own arguments)")
    p = sub.add_parser("plugins", help="list plugins, model specs, devices and patches")
    p.add_argument("--plugin", action="append", default=[], help="only this plugin (repeatable)")
    p.add_argument("--model", help="show one model spec and its Megatron-LM flags")
    p.add_argument("--patches", action="store_true", help="list the patches registered for the device")
    p.add_argument("--device", default=None, help="device for --patches (default: automatic)")
    p.set_defaults(func=cmd_plugins)
    q = sub.add_parser("quickstart", help="run the seed workflow on a tiny model (a few minutes on 2 CPU cores)")
    q.add_argument("--workdir", default="quickstart-out", help="where the stages write (default: %(default)s)")
    q.add_argument("--tokenizer", default=None, help="Aquila2 tokenizer folder (default: the bundled sample)")
    q.add_argument("--device", default=None, help="cpu, cuda or npu (default: automatic)")
    q.add_argument("--model", default=None, help="model spec (default: the model family's smoke-test model)")
    q.add_argument("--skip-tp2", action="store_true", help="skip the two-process tensor-parallel stage")
    q.add_argument("--alpaca", default=None, help="Alpaca parquet for the preprocessing stage (default: the 300 "
                                                  "records of the sample data)")
    q.add_argument("--stop-after", default=None, metavar="STAGE",
                   help="run the stages up to this one only (model, tokenize, transformers, tp1, fused, tp2, convert, "
                        "load-tp2, preprocess, pretrain, finetune, chat-finetune, lora-finetune, convert-trained, "
                        "generate, chat, evaluate, lm-eval)")
    q.set_defaults(func=cmd_quickstart)
    d = sub.add_parser("doctor", help="versions, devices, kernels, and what the NPU path lacks here")
    d.add_argument("--check", action="store_true",
                   help="run the device's kernels, a tiny model's training step and decode against the reference, "
                        "an all-reduce and the CANN check; exit 1 when anything is off")
    d.add_argument("--device", default=None, help="the device to check (default: the one aquila-npu selects)")
    d.add_argument("--no-all-reduce", dest="all_reduce", action="store_false",
                   help="skip the all-reduce across the local devices")
    d.set_defaults(func=cmd_doctor)
    return parser


# verbs with a command line of their own: `aquila-npu VERB ...` is `python -m aquila_npu.VERB ...`
VERBS = {"convert": "aquila_npu.convert.__main__", "preprocess": "aquila_npu.preprocess.__main__",
         "pretrain": "aquila_npu.training.loop", "generate": "aquila_npu.generate.__main__",
         "evaluate": "aquila_npu.evaluate.__main__", "lm-eval": "aquila_npu.lm_eval.__main__"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in VERBS:
        import importlib

        return importlib.import_module(VERBS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"aquila-npu: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
