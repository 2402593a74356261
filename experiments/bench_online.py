"""Online DeepConf over many problems: all at once (`online.solve_many`) against one problem at a
time (`online.solve` in a loop, what a user would run otherwise), same model, prompts and keys.

    python experiments/bench_online.py [--model results/arithmetic_model] [--problems 100]
        [--rule deepconf-high] [--out FILE]

The model folder is any local Hugging Face checkpoint with a tokenizer and a `problems.jsonl`
(`experiments/train_arithmetic.py` writes one); without `--model` found on disk, a random-init
Qwen3 with the arithmetic task's character tokenizer stands in (its traces rarely hold an
answer, so every problem spends its whole budget). Both sides are timed after a warm-up run of
the same problems (compilation excluded; `timing.best_of`), and must give the same answers,
launched traces and tokens. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import numpy as np

from jaxlab import results
from jaxlab.deepconf import arithmetic, online, prompts, voting
from jaxlab.deepconf.problems import load_problems
from jaxlab.models import hf, zoo
from jaxlab.sampling.sampler import SamplingConfig
from jaxlab.timing import best_of


def _model_and_prompts(path: pathlib.Path, count: int):
    """(model, tokenizer, prompt ids, problem texts) from a trained folder, or a stand-in."""
    if (path / "config.json").exists():
        problems = load_problems(path / "problems.jsonl")[:count]
        model, tokenizer = hf.load_pretrained(path), hf.load_tokenizer(path)
        texts = [p.prompt for p in problems]
    else:
        folder = zoo.create("qwen3", pathlib.Path(tempfile.mkdtemp()),
                            vocab_size=len(arithmetic.VOCAB))
        arithmetic.save_tokenizer(folder)
        model, tokenizer = hf.load_pretrained(folder), hf.load_tokenizer(folder)
        texts = [p.prompt for p in arithmetic.make_problems(count, 4, seed=0)]
    ids = prompts.build_prompts(tokenizer, texts, chat_template=prompts.has_chat_template(
        tokenizer))
    return model, tokenizer, ids, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="results/arithmetic_model")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--rule", default="deepconf-high", choices=sorted(voting.RULES))
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--consensus", type=float, default=0.95)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--tail", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="results/bench_online.json")
    args = parser.parse_args()

    model, tokenizer, ids, _ = _model_and_prompts(pathlib.Path(args.model), args.problems)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.6, top_p=0.95,
                              group_size=args.group_size, stop_ids=(tokenizer.eos_token_id,),
                              window=args.window, tail=args.tail)
    config = online.OnlineConfig(rule=args.rule, warmup=args.warmup, budget=args.budget,
                                 batch=args.batch, consensus=args.consensus)
    keys = jax.random.split(jax.random.key(0), len(ids))
    longest = max(len(p) for p in ids)

    def decode(row) -> str:
        return tokenizer.decode(row, skip_special_tokens=True)

    def one_at_a_time():
        return [online.solve(model, p, k, sampling, config, decode)
                for p, k in zip(ids, keys, strict=True)]

    def all_at_once():
        return online.solve_many(model, ids, keys, sampling, config, decode,
                                 max_prompt_tokens=longest)

    alone, alone_s = best_of(one_at_a_time, args.repeats)
    many, many_s = best_of(all_at_once, args.repeats)
    same = [(a.answer, a.launched, a.tokens) == (b.answer, b.launched, b.tokens)
            for a, b in zip(alone, many, strict=True)]
    report = {
        "problems": len(ids), "rule": args.rule, "model": args.model,
        "device": jax.devices()[0].device_kind, "sampling": {
            "max_new_tokens": args.max_new_tokens, "group_size": args.group_size,
            "window": args.window, "tail": args.tail},
        "online": {"warmup": args.warmup, "budget": args.budget, "batch": args.batch,
                   "consensus": args.consensus},
        "one_at_a_time_seconds": alone_s, "all_at_once_seconds": many_s,
        "speedup": alone_s / many_s, "same_answers": int(sum(same)),
        "tokens": int(sum(r.tokens for r in many)),
        "launched": int(sum(r.launched for r in many)),
        "rounds": float(np.mean([r.rounds for r in many]))}
    print(f"{len(ids)} problems, {args.rule}, {report['device']}: one at a time "
          f"{alone_s:.2f} s, all at once {many_s:.2f} s ({report['speedup']:.2f}x); same "
          f"answers, traces and tokens for {sum(same)}/{len(ids)}; {report['tokens']} tokens, "
          f"{report['launched']} traces, {report['rounds']:.2f} rounds per problem")
    results.write_json(pathlib.Path(args.out), report)


if __name__ == "__main__":
    main()
