"""Benchmark: E2E against GRAM Single-step and Multi-step on generated workloads.

``python -m gram_scale.bench --workload kt-small`` (see ``cli``). The modules, by reason to
change: ``workloads`` (what each workload trains and its data), ``children`` (running one
training run in its own process), ``costs`` (the epoch-time cost model and the Multi-step
overhead, measured in process), ``report`` (table rows, targets, ``results.md`` and the plot),
``llm`` (the 1B-parameter memory workload), ``tiny`` (tiny model folders, which the tests build
too) and ``cli``. Generated data and the tiny encoder go into the cache folder (``--cache-dir``,
``$GRAM_CACHE`` or ``~/.cache``).
"""
