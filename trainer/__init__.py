"""The trainer (`loraplex.trainer`): tenant data -> LoRA adapter -> registry version.

    loraplex train --base ./base --data acme.train.jsonl --name acme/upper --promote prod
    torchrun --nproc_per_node 2 -m loraplex.cli train --base ./base --data … --name …
    loraplex eval --base ./base --adapter acme/upper@prod --data acme.test.jsonl

Modules, one job each:
- `data`      JSONL parsing/validation, prompt rendering, completion-only labels
- `config`    the validated `TrainConfig` (YAML < flags)
- `model`     base loading (nf4 / int8 / none) and LoRA wrapping, target detection
- `recipe`    the automatic recipe: hyper-parameters from the data and the base (pure)
- `probe`     the learning-rate probe, whose winner the run goes on from
- `stopping`  the early stop: converged, a stall cuts the rate once, the next one stops
- `train`     the `transformers.Trainer` run: eval, best weights, budget, resume
- `callbacks` rich progress bar, metrics.jsonl, a fault hook for tests
- `evaluate`  loss and exact-match of greedy completions
- `publish`   lineage, registry push, promotion gate
- `tasks`     the three demo tenant tasks; `pretrain` the embedded base's pre-training
- `cli`       `loraplex train` / `loraplex eval`
"""
