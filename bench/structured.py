"""Constrained decoding cost and validity: decode steps with half the rows under a JSON
schema against the same batch with none, in one run.

    python -m bench.structured                       # micro base (built here), 16 rows
    python -m bench.structured --size tiny            # a larger random base
    python -m bench.structured --base-dir DIR         # any base, e.g. from
                                                      #   `loraplex base import smollm2-135m-instruct DIR`
    python -m bench.structured --json
    python -m bench.structured --masks [--base-dir DIR]   # masking alone: engine vs former path

Both runs submit the same `--rows` extraction prompts at once (greedy, bare base) so every
row decodes in the same forwards; run "free" has no constraint, run "half" puts every other
row under an extraction schema (`name`, `age`, `city`). A decode step is timed between
consecutive engine steps while all rows are still in the batch (prefill and the tail where
rows have finished are left out), the same first steps of both runs (the constrained rows
end sooner; later free steps attend over longer KV); the figure is the median step, and the
ratio half ÷ free is what to compare across machines. Target: <= 1.15x, and 100% of
constrained outputs valid against the schema (`jsonschema`), on a held-out set of
extraction prompts.

`--masks` times the masking alone, without a model: `--rows` rows, every other one under
the schema, replay a valid answer token by token through fresh grammar states; per step,
the engine's `grammar.mask_logits` against the torch path it replaced (kept here as the
baseline), interleaved in one run, on the base's tokenizer and vocabulary.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET_RATIO = 1.15
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "city": {"type": "string", "maxLength": 24}}}
# held out: written for this bench, never used to train or tune anything
PEOPLE = [("Alice Moreau", 31, "Lyon"), ("Bao Nguyen", 45, "Hanoi"), ("Carla Ruiz", 27, "Quito"),
          ("Dmitri Volkov", 62, "Kazan"), ("Efua Mensah", 38, "Accra"),
          ("Farid Haddad", 19, "Beirut"), ("Greta Lind", 54, "Malmo"), ("Hiro Sato", 23, "Osaka"),
          ("Ines Costa", 70, "Porto"), ("Jonas Berg", 41, "Bergen"),
          ("Kemi Adeyemi", 29, "Lagos"), ("Luis Ortega", 36, "Cusco"), ("Mira Shah", 50, "Pune"),
          ("Nils Ek", 66, "Umea"), ("Olga Petrova", 33, "Omsk"), ("Pablo Diaz", 47, "Cadiz")]


def prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        name, age, city = PEOPLE[i % len(PEOPLE)]
        out.append(f"Extract name, age and city as JSON.\nText: {name}, aged {age}, lives in "
                   f"{city}.\nJSON: ")
    return out


class StepClock:
    """Engine observer: times every step (monotonic clock at each `on_step`)."""

    def __init__(self) -> None:
        from loraplex.runtime.api.observer import EngineObserver

        clock = self
        self.marks: list[tuple[float, float, int]] = []
        self._lock = threading.Lock()

        class _Obs(EngineObserver):
            def on_step(self, batch_size: int, running: int, waiting: int) -> None:
                with clock._lock:
                    clock.marks.append((time.perf_counter(), time.process_time(),
                                        batch_size))

        self.observer = _Obs()

    def reset(self) -> None:
        with self._lock:
            self.marks.clear()

    def full_steps(self, rows: int) -> list[tuple[float, float]]:
        """(wall, process CPU) seconds of steps that ran all `rows` rows after a step that
        did too (decode). CPU time is what a shared machine cannot inflate by preempting us
        (the engine thread and torch's workers are the only busy threads of this process)."""
        with self._lock:
            m = list(self.marks)
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(m, m[1:], strict=False)
                if a[2] == rows and b[2] == rows]


def run(engine, clock: StepClock, texts: list[str], constrained: set[int], max_new: int):
    from loraplex.registry import Identity
    from loraplex.runtime.engine.engine import SamplingParams

    schema = json.dumps(SCHEMA)
    reqs = [engine.admit(f"r{i}-{len(constrained)}-{time.monotonic_ns()}", Identity.system(),
                         None, prompt=t,
                         sampling=SamplingParams(max_new_tokens=max_new,
                                                 json_schema=schema if i in constrained
                                                 else None))
            for i, t in enumerate(texts)]
    clock.reset()
    streams = [engine.submit(r) for r in reqs]
    results = [s.wait(600) for s in streams]
    return results, clock.full_steps(len(texts))


def torch_mask_logits(logits, states):
    """The torch mask path (this bench's baseline): a tensor view per row, the bits
    unpacked, `torch.where` on the bool mask, gather and scatter."""
    import torch

    from loraplex.runtime.decoding.grammar import unpack_bits

    rows = [i for i, st in enumerate(states) if st is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    bitmask = torch.zeros((len(rows), (vocab + 31) // 32), dtype=torch.int32)  # [R, W]
    for j, i in enumerate(rows):
        row = bitmask[j]
        states[i].matcher.unsafe_compute_mask_ptr(row.data_ptr(),
                                                  row.numel() * row.element_size())
    allowed = torch.from_numpy(unpack_bits(bitmask.numpy(), vocab))  # [R, V]
    idx = torch.tensor(rows)  # [R]
    logits[idx] = torch.where(allowed, logits[idx], torch.tensor(float("-inf")))
    return logits


def mask_replay(base: Path, rows: int, rounds: int = 20, repeats: int = 3) -> dict:
    """ms per step of `mask_logits` and of `torch_mask_logits` (min over `repeats`
    interleaved passes of `rounds` replays each); both must mask alike."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from loraplex.runtime.api.types import SamplingParams
    from loraplex.runtime.decoding.grammar import GrammarCompiler, mask_logits

    tok = AutoTokenizer.from_pretrained(base)
    vocab = AutoConfig.from_pretrained(base).vocab_size
    grammar = GrammarCompiler(tok, [tok.eos_token_id], vocab_size=vocab).compile(
        SamplingParams(json_schema=json.dumps(SCHEMA)))
    name, age, city = PEOPLE[0]
    answer = tok.encode(json.dumps({"name": name, "age": age, "city": city},
                                   separators=(",", ":")), add_special_tokens=False)

    def one_pass(fn) -> tuple[float, list]:
        spent, steps, seen = 0.0, 0, []
        gen = torch.Generator().manual_seed(0)
        for _ in range(rounds):
            states = [grammar.start() if i % 2 == 0 else None for i in range(rows)]
            for token in answer:
                logits = torch.randn((rows, vocab), generator=gen)  # [B, V]
                t0 = time.perf_counter()
                fn(logits, states)
                spent += time.perf_counter() - t0
                steps += 1
                seen.append(torch.isinf(logits).sum().item())
                for st in states:
                    if st is not None and not st.advance(token):
                        raise SystemExit("bench.structured: the replayed answer left the schema")
        return spent / steps * 1e3, seen

    times: dict[str, list[float]] = {"engine": [], "former": []}
    for _ in range(repeats):
        ms, ours = one_pass(mask_logits)
        times["engine"].append(ms)
        ms, theirs = one_pass(torch_mask_logits)
        times["former"].append(ms)
        if ours != theirs:
            raise SystemExit("bench.structured: the two mask paths disagree")
    eng, former = min(times["engine"]), min(times["former"])
    return {"rows": rows, "constrained_rows": (rows + 1) // 2, "vocab": vocab,
            "steps_per_pass": rounds * len(answer), "engine_mask_ms": round(eng, 3),
            "former_mask_ms": round(former, 3), "speedup": round(former / eng, 2),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-dir", type=Path, default=None, help="a loraplex base directory")
    ap.add_argument("--size", default="micro", help="random base to build (no --base-dir)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=320,
                    help="room for a random base's long escaped strings")
    ap.add_argument("--repeats", type=int, default=2, help="alternating free/half runs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--masks", action="store_true",
                    help="time the masking alone (engine vs a torch mask path)")
    args = ap.parse_args(argv)

    import jsonschema
    import torch

    from loraplex.runtime.engine.engine import Engine, EngineConfig

    tmp = tempfile.TemporaryDirectory()
    base = args.base_dir
    if base is None:
        from loraplex.basemodel import build_base

        base = build_base(Path(tmp.name) / "base", size=args.size, arch="llama", seed=0)
    if args.masks:
        out = {"base": str(args.base_dir or args.size), **mask_replay(base, args.rows)}
        tmp.cleanup()
        print(json.dumps(out, indent=2) if args.json else
              f"bench.structured --masks  base={out['base']}  vocab={out['vocab']}  "
              f"{out['rows']} rows ({out['constrained_rows']} under the schema)  "
              f"threads={out['threads']}\n  mask per step: engine {out['engine_mask_ms']:.3f} ms, "
              f"former torch path {out['former_mask_ms']:.3f} ms ({out['speedup']:.2f}x)")
        return out
    clock = StepClock()
    engine = Engine(EngineConfig(base_dir=base, quantization="none", device="cpu",
                                 max_batch=args.rows, max_slots=1,
                                 prefill_token_budget=64 * args.rows), None,
                    clock.observer).start()
    texts = prompts(args.rows)
    half = set(range(0, args.rows, 2))
    try:
        run(engine, clock, texts[:2], {0}, 4)  # warm-up (and the grammar compile)
        free_steps, half_steps, outputs = [], [], []
        for _ in range(args.repeats):  # alternate so drift hits both sides alike
            _, free = run(engine, clock, texts, set(), args.max_new)
            results, constrained = run(engine, clock, texts, half, args.max_new)
            # the same decode steps of both runs: constrained rows finish sooner, and a free
            # run's later steps attend over longer KV (3.5x slower per step on SmolLM2)
            n = min(len(free), len(constrained))
            free_steps += free[:n]
            half_steps += constrained[:n]
            outputs += [results[i] for i in sorted(half)]
    finally:
        engine.shutdown()
        tmp.cleanup()
    valid = 0
    for r in outputs:
        try:
            jsonschema.validate(json.loads(r.text), SCHEMA)
            valid += r.finish_reason == "stop"
        except (ValueError, jsonschema.ValidationError):
            pass
    def med(steps, k):
        return statistics.median(x[k] for x in steps) * 1e3 if steps else float("nan")

    free_ms, half_ms = med(free_steps, 0), med(half_steps, 0)
    free_cpu, half_cpu = med(free_steps, 1), med(half_steps, 1)
    out = {"base": str(args.base_dir or args.size), "rows": args.rows,
           "free_step_ms": round(free_ms, 3), "half_step_ms": round(half_ms, 3),
           "ratio": round(half_ms / free_ms, 3), "free_step_cpu_ms": round(free_cpu, 3),
           "half_step_cpu_ms": round(half_cpu, 3), "cpu_ratio": round(half_cpu / free_cpu, 3),
           "target_ratio": TARGET_RATIO,
           "steps_timed": [len(free_steps), len(half_steps)],
           "constrained_outputs": len(outputs), "valid": valid,
           "valid_pct": round(100.0 * valid / max(1, len(outputs)), 1),
           "example": outputs[0].text if outputs else None,
           "torch": torch.__version__, "machine": platform.machine(),
           "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"bench.structured  base={out['base']}  rows={args.rows}  "
              f"max_new={args.max_new}  threads={out['threads']}")
        print(f"{'run':<28}{'median step wall ms':>20}{'CPU ms':>10}{'steps timed':>13}")
        print(f"{'no constraint':<28}{free_ms:>20.2f}{free_cpu:>10.2f}{len(free_steps):>13}")
        print(f"{'half rows under JSON schema':<28}{half_ms:>20.2f}{half_cpu:>10.2f}"
              f"{len(half_steps):>13}")
        print(f"ratio wall {out['ratio']:.3f}x, CPU {out['cpu_ratio']:.3f}x (target <= "
              f"{TARGET_RATIO}x)   valid "
              f"{valid}/{len(outputs)} ({out['valid_pct']}%)   e.g. {out['example']}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
