"""Write a synthetic instruction set for `sqlgpt finetune --chat`: two tasks
built from the words of a text, as JSON Lines of conversations.

    python examples/instructions.py examples/tinyshakespeare.txt --out tasks

writes tasks.train.jsonl and tasks.test.jsonl (held-out word sets): "Which
comes first alphabetically: W1 or W2?" (chance: 50%) and "Reverse: W1 W2"
(chance: about none).
"""
import argparse
import json
import random
import re


def conversations(words, n, rng):
    for i in range(n):
        if i % 2:
            a, b = rng.sample(words, 2)
            yield [{"role": "user", "content": f"Which comes first alphabetically: {a} or {b}?"},
                   {"role": "assistant", "content": min(a, b)}]
        else:
            picked = rng.sample(words, 2)
            yield [{"role": "user", "content": "Reverse: " + " ".join(picked)},
                   {"role": "assistant", "content": " ".join(reversed(picked))}]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text")
    parser.add_argument("--out", default="tasks")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.text, encoding="utf-8") as f:
        words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{3,8}", f.read())})
    rng = random.Random(args.seed)
    rng.shuffle(words)
    held = len(words) // 5  # words the test conversations alone use
    for name, pool, n in (("train", words[held:], args.train), ("test", words[:held], args.test)):
        with open(f"{args.out}.{name}.jsonl", "w", encoding="utf-8") as f:
            for messages in conversations(pool, n, rng):
                f.write(json.dumps({"messages": messages}) + "\n")
        print(f"wrote {args.out}.{name}.jsonl: {n} conversations")


if __name__ == "__main__":
    main()
