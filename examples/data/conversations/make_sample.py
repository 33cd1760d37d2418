"""How alpaca_chat_200.jsonl was made: multi-turn conversations built from the bundled Alpaca records (no other
source), in both shapes the conversation handler reads. Run from this folder: python make_sample.py"""

import json

import pyarrow.parquet as pq

records = pq.read_table("../alpaca/alpaca_300.parquet", columns=["instruction", "input", "output"]).to_pylist()


def ask(record):
    return record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")


with open("alpaca_chat_200.jsonl", "w", encoding="utf-8") as out:
    for k in range(200):
        turns = records[k:k + (3 if k % 3 == 0 else 2)]  # two or three exchanges
        if k % 2 == 0:  # ShareGPT
            conversation = [t for r in turns for t in ({"from": "human", "value": ask(r)},
                                                       {"from": "gpt", "value": r["output"]})]
            row = {"conversations": conversation}
            if k % 4 == 0:
                row["system"] = "You are a helpful assistant."
        else:           # OpenAI messages
            row = {"messages": [m for r in turns for m in ({"role": "user", "content": ask(r)},
                                                           {"role": "assistant", "content": r["output"]})]}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
