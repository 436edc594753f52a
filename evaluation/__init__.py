"""
Evaluation of SARA checkpoints, one file per concern (eval.py is the command line):
  benchmarks.py  one record per benchmark (Global-MMLU / BELEBELE / MGSM): files -> items, gold formats,
                 protocols, prompts (templates; lm-evaluation-harness's for the harness protocol)
  scoring.py     \\boxed{} extraction, letters and numbers -> prediction, correct; the harness's extraction
  generate.py    batched generation and option log-likelihoods (responders)
  accuracy.py    run a benchmark, per-language accuracy, tables, outputs, pairing two conditions
  routing.py     routing divergence per layer and language (paper Figure 5); the band rule
  figures.py     the routing figures (matplotlib optional)
Statistics live in the top-level stats.py, shared with experiments/. The input-file reader and the prompts
and gold formats shared with stage 1 live in data/ (data/rows.py, data/prompts.py): evaluation imports
data, never the reverse.
"""
