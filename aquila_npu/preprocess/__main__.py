"""``python -m aquila_npu.preprocess`` / ``aquila-npu preprocess``: records -> Megatron indexed datasets.

The seed guide's (ModelLink) flags work unchanged::

    --input alpaca.parquet --tokenizer-name-or-path TOKENIZER_DIR --output-prefix dataset/alpaca \
        --workers 4 --log-interval 1000 --tokenizer-type PretrainedFromHF
      -> dataset/alpaca_text_document.bin/.idx                 (pretraining, GeneralPretrainHandler)
    ... --handler-name GeneralInstructionHandler --append-eod
      -> dataset/alpaca_packed_{input_ids,attention_mask,labels}_document.bin/.idx   (instruction tuning)
    ... --handler-name SharegptStyleInstructionHandler --prompt-type aquila-v1 [--map-keys JSON]
      -> the same three datasets from multi-turn conversations (ShareGPT or OpenAI messages)
    ... --pack --seq-length 2048   (either instruction handler)
      -> the same three datasets, several samples a sequence (train with --reset-position-ids --reset-attention-mask)

Ours in addition: ``--skip-bad-records`` (skip and count malformed records instead of stopping at the first),
``--batch-size`` (records per tokenizer batch), ``--no-progress``.
"""

from __future__ import annotations

import argparse
import sys

from aquila_npu.preprocess.handlers import HANDLERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aquila_npu.preprocess",
                                     description="Tokenise parquet/JSON records into Megatron indexed datasets.")
    parser.add_argument("--input", required=True, help="a .parquet, .json (list or lines) or .jsonl file, a folder "
                                                       "of them, or a glob")
    parser.add_argument("--tokenizer-name-or-path", required=True, help="folder with the tokenizer files")
    parser.add_argument("--output-prefix", required=True, help="path prefix of the .bin/.idx outputs")
    parser.add_argument("--tokenizer-type", default="PretrainedFromHF",
                        help="PretrainedFromHF (seed) or HuggingFaceTokenizer (Megatron-LM): the same thing")
    parser.add_argument("--handler-name", default="GeneralPretrainHandler", choices=sorted(HANDLERS))
    parser.add_argument("--prompt-type", default=None,
                        help="conversation data: the chat template it is written in (aquila2: aquila-v1, "
                             "aquila-legacy, aquila)")
    parser.add_argument("--map-keys", default=None,
                        help='conversation data in other field names, as JSON: {"messages": FIELD, "system": FIELD, '
                             '"tags": {"role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag"}}')
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="fields to tokenise with the pretraining handler (default: text)")
    parser.add_argument("--append-eod", action="store_true", help="end each sample with the eos (end-of-document) id")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="drop (and count) samples of this many tokens or more, as ModelLink does")
    parser.add_argument("--pack", "--neat-pack", action="store_true",
                        help="instruction / conversation data: pack whole samples into sequences of --seq-length "
                             "tokens, recording where each starts (MindSpeed-LLM's --neat-pack); train with "
                             "--reset-position-ids --reset-attention-mask")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer threads, one core each (output is the same for any)")
    parser.add_argument("--log-interval", type=int, default=1000,
                        help="documents between progress lines when not on a terminal")
    parser.add_argument("--tokenizer-not-use-fast", action="store_true",
                        help="accepted for the seed's scripts; the fast tokenizer is used (same ids)")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="skip and count malformed records instead of stopping at the first one")
    parser.add_argument("--batch-size", type=int, default=1000, help="records per tokenizer batch")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from aquila_npu import distributed
    from aquila_npu.preprocess import PreprocessOptions, preprocess

    options = PreprocessOptions(
        input=args.input, tokenizer=args.tokenizer_name_or_path, output_prefix=args.output_prefix,
        handler=args.handler_name, json_keys=tuple(args.json_keys), append_eod=args.append_eod,
        seq_length=args.seq_length, workers=args.workers, batch_size=args.batch_size,
        skip_bad_records=args.skip_bad_records, tokenizer_type=args.tokenizer_type,
        log_interval=args.log_interval, progress=not args.no_progress, prompt_type=args.prompt_type,
        map_keys=args.map_keys, pack=args.pack)

    def run() -> None:
        result = preprocess(options)
        print(f"preprocess: {result.summary()}")
        for key, prefix in result.outputs.items():
            print(f"  {key}: {prefix}.bin / .idx ({result.dtypes[key]}, {result.tokens[key]:,} tokens)")

    return distributed.run_command("preprocess", run, interrupted="no dataset was written")


if __name__ == "__main__":
    sys.exit(main())
